"""Many producers, one dataset: combine manifests written by several tasks or machines into one.

`fuxi data merge OUT_0 OUT_1 ... --out DATASET` reads each folder's `manifest.json`, or its task manifests
(`task-<rank>-of-<tasks>.manifest.json`, what `fuxi data pack --local-tasks` leaves on each machine), checks
them and writes `DATASET/manifest.json`, whose shard paths point at the shards where they are (relative
paths, no copy). The loader reads it like any other manifest.

Checks, each failing with the file and field at fault: the same split, sequence length, vocabulary, EOS id,
language list and tokenizer hash everywhere; every shard present with the recorded size and sha256; per
language, the shards' tokens equal the manifest's packed tokens (tokens minus the dropped tail) and samples
times the block length; task manifests of one plan cover every task exactly once.
"""
from __future__ import annotations

import os
from pathlib import Path

from fuxi.data_pipeline.errors import ManifestError
from fuxi.data_pipeline.manifest import MANIFEST_NAME, LanguageStats, Manifest, ShardInfo, load_manifest

TASK_GLOB = "task-*.manifest.json"
_SAME = ("split", "seq_len", "vocab_size", "eos_id", "languages", "tokenizer_hash")


def task_manifest_name(rank: int, tasks: int) -> str:
    return f"task-{rank:05d}-of-{tasks:05d}.manifest.json"


def find_manifests(sources: list[str | Path]) -> list[Path]:
    """Each source: a manifest file, or a folder with manifest.json or task manifests."""
    found = []
    for source in sources:
        source = Path(source)
        if source.is_file():
            found.append(source)
        elif (source / MANIFEST_NAME).is_file():
            found.append(source / MANIFEST_NAME)
        elif source.is_dir() and (tasks := sorted(source.glob(TASK_GLOB))):
            found += tasks
        else:
            raise ManifestError(f"{source}: no manifest.json and no task manifests ({TASK_GLOB})")
    return found


def check_token_counts(manifest: Manifest) -> None:
    """Per language: shard tokens == packed tokens == samples x block length."""
    shard_tokens = manifest.tokens_per_language()
    samples = manifest.samples_per_language()
    for lang, stats in manifest.language_stats.items():
        packed = stats.tokens - stats.dropped_tokens
        if shard_tokens.get(lang, 0) != packed or samples.get(lang, 0) * manifest.block_len != packed or \
                samples.get(lang, 0) != stats.samples:
            raise ManifestError(f"{manifest.path}: language_stats.{lang}: {stats.tokens} tokens - "
                                f"{stats.dropped_tokens} dropped = {packed}, but its shards hold "
                                f"{shard_tokens.get(lang, 0)} tokens in {samples.get(lang, 0)} samples of "
                                f"{manifest.block_len}")


def _check_tasks(manifests: list[Manifest]) -> None:
    tasks = [m for m in manifests if m.task]
    if not tasks:
        return
    plans = {m.task["plan"] for m in tasks}
    if len(plans) > 1 or len(tasks) != len(manifests):
        raise ManifestError(f"task manifests of different pack jobs (plans {sorted(plans)[:3]}) or mixed with "
                            f"whole manifests: {[str(m.path) for m in manifests][:6]}")
    total = tasks[0].task["tasks"]
    ranks = [m.task["rank"] for m in tasks]
    missing = sorted(set(range(total)) - set(ranks))
    twice = sorted({r for r in ranks if ranks.count(r) > 1})
    if missing or twice:
        raise ManifestError(f"the pack job has {total} tasks; missing task manifests for {missing}, given twice: "
                            f"{twice} (from {sorted({str(m.path.parent) for m in tasks})})")


def merge_manifests(sources: list[str | Path], out_dir: str | Path, verify: bool = True,
                    tokenizer_path: str | None = None) -> Path:
    """Check and combine the manifests of `sources` into `out_dir/manifest.json`; returns its path.
    tokenizer_path: what the merged manifest records (default: the first manifest's, re-rooted)."""
    out_dir = Path(out_dir).absolute()
    manifests = [load_manifest(p) for p in find_manifests(sources)]
    if not manifests:
        raise ManifestError(f"{sources}: nothing to merge")
    first = manifests[0]
    for m in manifests[1:]:
        for name in _SAME:
            if getattr(m, name) != getattr(first, name):
                raise ManifestError(f"{m.path}: {name} {getattr(m, name)!r} differs from {first.path}'s "
                                    f"{getattr(first, name)!r}; these shards cannot form one dataset")
    _check_tasks(manifests)
    stats = {lang: LanguageStats() for lang in first.languages}
    shards: list[ShardInfo] = []
    seen: dict[Path, Path] = {}
    for m in manifests:
        m.check_files(checksums=verify)
        check_token_counts(m)
        for lang, s in m.language_stats.items():
            stats.setdefault(lang, LanguageStats()).add(s)
        for shard in m.shards:
            path = m.shard_path(shard).resolve()
            if path in seen:
                raise ManifestError(f"{m.path}: shard {path} is also listed in {seen[path]}")
            seen[path] = m.path
            shards.append(ShardInfo(os.path.relpath(path, out_dir), shard.language, shard.samples, shard.bytes,
                                    shard.sha256, shard.tokens_per_language))
    shards.sort(key=lambda s: (first.languages.index(s.language), Path(s.path).name))
    if tokenizer_path is None and first.tokenizer_path is not None:
        tokenizer_path = os.path.relpath((first.root / first.tokenizer_path).resolve(), out_dir)
    merged = Manifest(split=first.split, seq_len=first.seq_len, tokenizer_hash=first.tokenizer_hash,
                      vocab_size=first.vocab_size, eos_id=first.eos_id, languages=first.languages,
                      language_stats=stats, shards=shards, seed=first.seed, tokenizer_path=tokenizer_path)
    return merged.save(out_dir / MANIFEST_NAME)
