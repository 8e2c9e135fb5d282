"""The shard manifest: what a set of shards holds and how to check it.

One JSON file per split, beside its shards. Per shard: path, language, samples, bytes, sha256 and tokens per
language. Per language: documents, tokens, UTF-8 bytes (so the trainer can turn per-language loss into
bits per byte), samples and tokens dropped at the tail. Plus the sequence length and the tokenizer's hash,
which readers compare against their config so a mismatch is an error rather than silent garbage.

A manifest at a URL (`s3://bucket/train/manifest.json`, or its folder) is read from a local copy in the cache
(remote.py), and each shard is fetched beside it when first read (`fetch_shard`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuxi.common.atomic import sha256_file, write_json
from fuxi.common.errors import DataError
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.errors import ManifestError, ShardError

MANIFEST_NAME = "manifest.json"
FORMAT = "fuxi-shards/1"
TOKEN_DTYPE, LANG_DTYPE, DOC_DTYPE = "uint32", "uint16", "uint32"


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's directory
    language: str
    samples: int
    bytes: int
    sha256: str
    tokens_per_language: dict[str, int]


@dataclass
class LanguageStats:
    documents: int = 0
    tokens: int = 0  # all tokens of the language's documents, EOS included, before the tail was dropped
    utf8_bytes: int = 0
    samples: int = 0
    dropped_tokens: int = 0  # the last partial block

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / self.tokens if self.tokens else float("nan")

    def add(self, other: "LanguageStats") -> None:
        for name in ("documents", "tokens", "utf8_bytes", "samples", "dropped_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Manifest:
    split: str
    seq_len: int
    tokenizer_hash: str
    vocab_size: int
    eos_id: int
    languages: list[str]
    language_stats: dict[str, LanguageStats]
    shards: list[ShardInfo]
    seed: int = 0
    format: str = FORMAT
    tokenizer_path: str | None = None  # informational
    # Set on the manifest one task of a pack job writes: {"rank", "tasks", "plan"} (merge.py combines them).
    task: dict | None = None
    path: Path | None = field(default=None, compare=False)  # where it was loaded from (a remote one's local copy)
    remote: str | None = field(default=None, compare=False)  # the URL of the folder of a remote manifest

    @property
    def block_len(self) -> int:
        return self.seq_len + 1

    @property
    def root(self) -> Path:
        if self.path is None:
            raise ManifestError("manifest has no path; save or load it first")
        return self.path.parent

    @property
    def bytes_per_token(self) -> dict[str, float]:
        """UTF-8 bytes per token of each language (loss in nats / ln 2 / this = bits per byte)."""
        return {lang: s.bytes_per_token for lang, s in self.language_stats.items()}

    def lang_index(self, lang: str) -> int:
        try:
            return self.languages.index(lang)
        except ValueError:
            raise ManifestError(f"{self.path}: language {lang!r} is not in this manifest's languages "
                                f"{self.languages}") from None

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.path

    def fetch_shard(self, shard: ShardInfo) -> Path:
        """The local file of a shard: a remote manifest's shard is downloaded into the cache unless a copy of
        the recorded size is there (ShardReader then checks its sha256); a missing one is a ShardError."""
        path = self.shard_path(shard)
        if self.remote is not None and not (path.is_file() and path.stat().st_size == shard.bytes):
            try:
                remote.fetch_file(f"{self.remote}/{shard.path}", path)
            except DataError as err:
                raise ShardError(f"shard {err} (listed in {self.remote}/{MANIFEST_NAME})") from None
        return path

    def samples_per_language(self) -> dict[str, int]:
        return {lang: sum(s.samples for s in self.shards if s.language == lang) for lang in self.languages}

    def tokens_per_language(self) -> dict[str, int]:
        return {lang: sum(s.tokens_per_language.get(lang, 0) for s in self.shards) for lang in self.languages}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d.pop("remote")
        d["block_len"] = self.block_len
        d["dtypes"] = {"tokens": TOKEN_DTYPE, "lang": LANG_DTYPE, "doc": DOC_DTYPE}
        for lang, s in self.language_stats.items():
            d["language_stats"][lang]["bytes_per_token"] = s.bytes_per_token
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.to_dict(), fsync=True)
        self.path = path
        return path

    def check_files(self, checksums: bool = False) -> None:
        """Every shard exists with the recorded size (and, with `checksums`, the recorded sha256). A remote
        manifest's shards are checked by size in one listing, without downloading them."""
        if self.remote is not None:
            found = remote.list_files(self.remote)
            for shard in self.shards:
                url = f"{self.remote}/{shard.path}"
                if shard.path not in found:
                    raise ShardError(f"shard {url}: missing (listed in {self.remote}/{MANIFEST_NAME})")
                if found[shard.path][0] != shard.bytes:
                    raise ShardError(f"shard {url}: {found[shard.path][0]} bytes but the manifest says "
                                     f"{shard.bytes} (truncated or rewritten?)")
            if checksums:
                for shard in self.shards:
                    self.fetch_shard(shard)
            else:
                return
        for shard in self.shards:
            p = self.shard_path(shard)
            if not p.is_file():
                raise ShardError(f"shard {p}: missing (listed in {self.path})")
            size = os.path.getsize(p)
            if size != shard.bytes:
                raise ShardError(f"shard {p}: {size} bytes on disk but the manifest {self.path} says "
                                 f"{shard.bytes} (truncated or rewritten?)")
            if checksums:
                digest = sha256_file(p)
                if digest != shard.sha256:
                    raise ShardError(f"shard {p}: sha256 {digest[:16]}... disagrees with the manifest's "
                                     f"{shard.sha256[:16]}... ({self.path})")


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest (a local path or a URL, see the module docstring); every problem names the file
    and the field."""
    if remote.is_url(path):
        url = str(path).rstrip("/")
        folder = url.rsplit("/", 1)[0] if url.endswith(".json") else url
        local = remote.mirror_of(folder, "shards") / (url.rsplit("/", 1)[1] if url.endswith(".json")
                                                      else MANIFEST_NAME)
        manifest = load_manifest(remote.fetch_file(folder + "/" + local.name, local))
        manifest.remote = folder
        return manifest
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: format: expected {FORMAT!r}, got {data.get('format')!r}")

    def need(key: str, kind: type):
        if key not in data:
            raise ManifestError(f"{path}: {key}: missing")
        if not isinstance(data[key], kind) or isinstance(data[key], bool) and kind is not bool:
            raise ManifestError(f"{path}: {key}: expected {kind.__name__}, got {data[key]!r}")
        return data[key]

    languages = need("languages", list)
    try:
        shards = [ShardInfo(**s) for s in need("shards", list)]
        stats = {lang: LanguageStats(**{k: v for k, v in s.items() if k != "bytes_per_token"})
                 for lang, s in need("language_stats", dict).items()}
    except TypeError as err:
        raise ManifestError(f"{path}: shards/language_stats: {err}") from None
    for shard in shards:
        if shard.language not in languages:
            raise ManifestError(f"{path}: shards: {shard.path} has language {shard.language!r} not in "
                                f"languages {languages}")
    seq_len = need("seq_len", int)
    if data.get("block_len", seq_len + 1) != seq_len + 1:
        raise ManifestError(f"{path}: block_len {data['block_len']} != seq_len + 1 = {seq_len + 1}")
    return Manifest(split=need("split", str), seq_len=seq_len, tokenizer_hash=need("tokenizer_hash", str),
                    vocab_size=need("vocab_size", int), eos_id=need("eos_id", int), languages=languages,
                    language_stats=stats, shards=shards, seed=data.get("seed", 0),
                    tokenizer_path=data.get("tokenizer_path"), task=data.get("task"), path=path)
