"""The pipeline steps of `fuxi data pack`: plan (1 task), pack (--tasks), merge (1 task). Each step reads the
job's settings (`pack.PackJob`) as `self.job`.

Work folder: `plan.json` (the parts: language, part, first document id; the tokenizer's hash and vocabulary
size) and `offsets/<lang index>.npy` (each language's documents in the shuffled order: byte offset, line
number); `results/<part>.json` per finished part (a re-run of a killed task skips the parts it had finished);
`staging/`, the next output folder: shards and one task manifest per task, then `manifest.json` and
`pack_report.json`, switched in place of the output folder by the merge step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from fuxi.common.atomic import write_json
from fuxi.common.staging import switch_folder
from fuxi.data_pipeline.dedup_stages import save_npy
from fuxi.data_pipeline.encoders import FastEncoder
from fuxi.data_pipeline.engine import TaskStep, deal
from fuxi.data_pipeline.job import FinishStep
from fuxi.data_pipeline.manifest import MANIFEST_NAME, LanguageStats, Manifest, ShardInfo
from fuxi.data_pipeline.merge import merge_manifests, task_manifest_name
from fuxi.data_pipeline.packing import (BlockPacker, PackPart, encode_documents, language_files, plan_parts,
                                        read_documents)
from fuxi.data_pipeline.shards import ShardWriter
from fuxi.data_pipeline.tokenizer import EOS_ID, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)


@dataclass
class PackResult:
    lang: str
    part: int
    shards: list[ShardInfo]
    stats: LanguageStats


def pack_part(part: PackPart, job, languages: list[str], encoder: FastEncoder) -> PackResult:
    """Read, tokenize, pack and write the shards of one part (into the job's staging folder)."""
    prefix = f"{job.split}-{part.lang}-{part.part:04d}"
    writer = ShardWriter(job.staging, prefix, part.lang, languages, job.shard_bytes)
    packer = BlockPacker(part.lang_index, job.seq_len + 1, part.first_doc)
    stats = LanguageStats()
    try:
        for i in range(0, len(part.offsets), job.chunk_docs):
            lines = None if part.lines is None else part.lines[i:i + job.chunk_docs]
            texts = read_documents(part.path, part.offsets[i:i + job.chunk_docs], part.lang, lines)
            tokens, lengths = encode_documents(encoder, texts)
            stats.documents += len(texts)
            stats.tokens += len(tokens)
            stats.utf8_bytes += sum(len(t.encode("utf-8")) for t in texts)
            for block in packer.add(tokens, lengths):
                writer.write(block)
                stats.samples += 1
    except BaseException:
        writer.abort()
        raise
    stats.dropped_tokens = len(packer.tokens)
    return PackResult(part.lang, part.part, writer.close(), stats)


def _load_plan(job) -> dict:
    return json.loads((job.work_dir / "plan.json").read_text(encoding="utf-8"))


def _deal(parts: list[dict], world_size: int) -> list[list[int]]:
    """Part indices per task, balanced by documents."""
    return deal([p["count"] for p in parts], world_size)


class PlanPack(TaskStep):
    name = "plan"

    def run_task(self, rank: int, world_size: int) -> None:
        job = self.job
        files = language_files(job.corpus)
        languages = job.languages or sorted(files)
        unknown = sorted(set(files) - set(languages))
        if unknown:
            log.warning("pack %s: ignoring %s (not in the language list)", job.corpus, unknown)
        parts = plan_parts(files, languages, job.seed, job.docs_per_part)
        by_lang: dict[int, list[np.ndarray]] = {}
        for part in parts:  # per document: byte offset and line number (for errors), in the shuffled order
            by_lang.setdefault(part.lang_index, []).append(np.stack([part.offsets, part.lines], axis=1))
        for lang_index, docs in by_lang.items():
            save_npy(job.work_dir / "offsets" / f"{lang_index}.npy", np.concatenate(docs))
        records = [{"lang": p.lang, "lang_index": p.lang_index, "path": p.path, "first_doc": p.first_doc,
                    "part": p.part, "count": len(p.offsets)} for p in parts]
        digest = hashlib.sha256(json.dumps([records, job.seed, job.docs_per_part, job.seq_len, job.split,
                                            languages], sort_keys=True).encode()).hexdigest()[:16]
        # the tokenizer is parsed here once, not again by every task (each task parses it only to encode)
        write_json(job.work_dir / "plan.json", {"languages": languages, "parts": records, "plan": digest,
                                                "vocab_size": load_tokenizer(job.tokenizer_dir).get_vocab_size(),
                                                "tokenizer_hash": tokenizer_hash(job.tokenizer_dir)})
        self.count("parts", len(parts))


class PackTasks(TaskStep):
    """Pack the parts dealt to this task; write its shards and its task manifest into the staging folder."""

    name = "pack"

    def describe(self, rank: int, world_size: int) -> str:
        try:
            plan = _load_plan(self.job)
        except (OSError, ValueError):
            return ""
        mine = [plan["parts"][i] for i in _deal(plan["parts"], world_size)[rank]]
        return ", ".join(f"{p['path']} part {p['part']}" for p in mine[:3]) + (" ..." if len(mine) > 3 else "")

    def workload(self, rank: int, world_size: int) -> tuple[int | None, int | None]:
        plan = _load_plan(self.job)
        return sum(plan["parts"][i]["count"] for i in _deal(plan["parts"], world_size)[rank]
                   if not (self.job.work_dir / "results" / f"{i:06d}.json").is_file()), None

    def run_task(self, rank: int, world_size: int) -> dict:
        job = self.job
        plan = _load_plan(job)
        languages = plan["languages"]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        encoder = None
        results: list[PackResult] = []
        for i in _deal(plan["parts"], world_size)[rank]:
            done = job.work_dir / "results" / f"{i:06d}.json"
            if done.is_file():
                results.append(_result_from_json(json.loads(done.read_text(encoding="utf-8"))))
                continue
            if encoder is None:
                encoder = FastEncoder(job.tokenizer_dir, prefer_fast=job.fast_encoder)
            rec = plan["parts"][i]
            docs = np.load(job.work_dir / "offsets" / f"{rec['lang_index']}.npy", mmap_mode="r")
            docs = np.asarray(docs[rec["first_doc"]:rec["first_doc"] + rec["count"]])
            part = PackPart(rec["lang"], rec["lang_index"], rec["path"], docs[:, 0], rec["first_doc"], rec["part"],
                            docs[:, 1])
            result = pack_part(part, job, languages, encoder)
            self.advance(result.stats.documents, result.stats.utf8_bytes)
            write_json(done, {"lang": result.lang, "part": result.part, "stats": asdict(result.stats),
                              "shards": [asdict(sh) for sh in result.shards]})
            results.append(result)
        results.sort(key=lambda r: (languages.index(r.lang), r.part))
        stats = {lang: LanguageStats() for lang in languages}
        for r in results:
            stats[r.lang].add(r.stats)
        manifest = Manifest(
            split=job.split, seq_len=job.seq_len, tokenizer_hash=plan["tokenizer_hash"],
            vocab_size=plan["vocab_size"], eos_id=EOS_ID, languages=languages,
            language_stats=stats, shards=[sh for r in results for sh in r.shards], seed=job.seed,
            tokenizer_path=job.tokenizer_path,
            task={"rank": rank, "tasks": world_size, "plan": plan["plan"]})
        manifest.save(job.staging / task_manifest_name(rank, world_size))
        tokens = sum(st.tokens for st in stats.values())
        self.count("documents", sum(st.documents for st in stats.values()))
        self.count("tokens", tokens)
        return {"parts": len(results), "docs_in": sum(st.documents for st in stats.values()), "tokens": tokens,
                "samples": sum(st.samples for st in stats.values()), "shards": len(manifest.shards)}


def _result_from_json(data: dict) -> PackResult:
    return PackResult(data["lang"], data["part"], [ShardInfo(**sh) for sh in data["shards"]],
                      LanguageStats(**data["stats"]))


class MergeTasks(FinishStep):
    """Check and combine the task manifests into manifest.json, write pack_report.json, then switch the new
    folder into place."""

    name = "merge"

    def finish(self) -> None:
        job = self.job
        staging = job.staging
        for leftover in [*staging.glob(".*.tmp"), staging / MANIFEST_NAME]:  # from a killed attempt
            leftover.unlink(missing_ok=True)
        path = merge_manifests([staging], staging, verify=False,
                               tokenizer_path=job.tokenizer_path)
        manifest = json.loads(path.read_text(encoding="utf-8"))
        for lang, st in manifest["language_stats"].items():
            if st["samples"] == 0:
                log.warning("pack %s: language %s has %d tokens, fewer than one block of %d: no samples",
                            job.split, lang, st["tokens"], job.seq_len + 1)
        tasks = {p.stem: json.loads(p.read_text())
                 for p in sorted((job.work_dir / "taskstats" / "pack").glob("*.json"))}
        write_json(staging / job.record, {"split": job.split, "job": self.job_hash, "tasks": tasks})
        switch_folder(staging, job.out_dir)
