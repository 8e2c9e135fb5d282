"""Stage 3, tokenize and pack: documents -> EOS-terminated token streams -> fixed blocks of seq_len + 1.

Per language, documents are shuffled (T5-style packing, FuxiTranyu §3.5), each followed by EOS (id 0),
concatenated and cut into blocks of seq_len + 1 tokens (packing.py). Every token carries its language index
(into the manifest's `languages`) and its document index (unique within the language), which the trainer needs
for per-language loss, document masking and the MoE-LPR language prior. Blocks are monolingual, so the stream
can mix languages by weight.

`pack()` runs a `PackJob` (job.py) as tasks of the data engine, in three stages (their steps:
`pack_stages.py`): `plan` (1 task) shuffles each language's documents and cuts them into parts of
`docs_per_part`; `pack` (--tasks tasks) packs each part dealt to it from end to end (read, tokenize, pack,
write its own shards; each part drops its tail shorter than one block, counted in the manifest) and writes a
task manifest; `merge` (1 task) checks and combines the task manifests and switches the new folder in place
of the old one. Parts and their shards depend only on the data and the seed, never on the number of tasks,
processes or machines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fuxi.common.errors import ConfigError
from fuxi.common.staging import switch_folder
from fuxi.data_pipeline import remote
from fuxi.data_pipeline.engine import ExecutorConfig, Stage
from fuxi.data_pipeline.job import Job, run_job
from fuxi.data_pipeline.manifest import MANIFEST_NAME
from fuxi.data_pipeline.pack_stages import MergeTasks, PackTasks, PlanPack
from fuxi.data_pipeline.packing import language_files
from fuxi.data_pipeline.tokenizer import load_tokenizer


@dataclass
class PackJob(Job):
    """What every pack task needs (the steps read it as `self.job`)."""

    name: ClassVar[str] = "pack"
    record: ClassVar[str] = "pack_report.json"
    shares: ClassVar[bool] = True  # a machine's shards and task manifests, for `fuxi data merge`

    corpus: str
    tokenizer_dir: str
    split: str
    seq_len: int
    languages: list[str] | None
    shard_bytes: int
    seed: int
    chunk_docs: int
    docs_per_part: int
    fast_encoder: bool
    tokenizer_path: str  # recorded in the manifest: the tokenizer as seen from out_dir (remote.relative_location)

    @property
    def staging(self) -> Path:
        """Where the tasks write shards and task manifests; switched in place of out_dir at the end."""
        return self.work_dir / "staging"

    def inputs(self) -> list[str | Path]:
        return [self.corpus, Path(self.tokenizer_dir) / "tokenizer.json"]

    def parallelism(self) -> int:
        return len(language_files(self.corpus))  # each language file is one part or more

    def owned(self) -> tuple[str, ...]:
        return MANIFEST_NAME, "*.tar", "task-*.manifest.json", self.record

    def stages(self, job_hash: str, tasks: int) -> list[Stage]:
        import webdataset  # noqa: F401 - imported once here, not in every forked task (it imports torch)
        return [Stage("plan", PlanPack(self), 1, parallel=False),
                Stage("pack", PackTasks(self), tasks),
                Stage("merge", MergeTasks(self, job_hash), 1, parallel=False)]

    def result(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    def publish_share(self, executor: ExecutorConfig) -> None:
        switch_folder(self.staging, self.out_dir)  # this machine's shards and task manifests
        print(f"pack: tasks {executor.rank_offset}-{executor.rank_offset + executor.local_tasks - 1} of "
              f"{executor.num_tasks} -> {self.out_dir}; combine all machines' folders with `fuxi data merge`")


def pack(corpus: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *, split: str = "train",
         seq_len: int = 2048, languages: list[str] | None = None, shard_bytes: int = 128 << 20,
         num_proc: int | None = None, seed: int = 0, chunk_docs: int = 256, docs_per_part: int = 50_000,
         fast_encoder: bool = True, progress: bool = True, executor: ExecutorConfig | None = None,
         work_dir: str | Path | None = None, keep_work: bool = False) -> Path | None:
    """Tokenize and pack a cleaned split directory into webdataset shards plus `out_dir/manifest.json`; returns
    the manifest path, or None when the job was submitted to a cluster or this machine ran only some tasks
    (then its folder holds their task manifests, for `fuxi data merge`). Each of corpus, tokenizer_dir and
    out_dir may be a URL (`s3://...`, remote.py); for an out_dir URL the returned manifest is its local copy.

    languages: the ordered language list the language ids index (give the same list for train and valid);
    default: the languages found, sorted. fast_encoder: encode with tiktoken/sentencepiece where they are
    checked equal to the HF tokenizer (encoders.py). executor: an `engine.ExecutorConfig` (default: local, with
    `num_proc` processes and as many tasks). work_dir: intermediate files (default: `.<out>.work` beside the
    output), removed after success unless `keep_work`.
    """
    for name, value in (("seq_len", seq_len), ("shard_bytes", shard_bytes), ("docs_per_part", docs_per_part),
                        ("chunk_docs", chunk_docs)):
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
    if languages is not None and len(set(languages)) != len(languages):
        raise ConfigError("languages", f"duplicates in {languages}")
    tokenizer_path = remote.relative_location(tokenizer_dir, out_dir)
    corpus, tokenizer_dir = remote.local_input(corpus), remote.local_input(tokenizer_dir)
    local_out, upload_to = remote.local_output(out_dir)
    language_files(corpus)  # fail now on a bad corpus, not in a task
    load_tokenizer(tokenizer_dir)
    job = PackJob(out_dir=local_out, work_dir=work_dir, corpus=str(Path(corpus).absolute()),
                  tokenizer_dir=str(Path(tokenizer_dir).absolute()), split=split, seq_len=seq_len,
                  languages=list(languages) if languages else None, shard_bytes=shard_bytes, seed=seed,
                  chunk_docs=chunk_docs, docs_per_part=docs_per_part, fast_encoder=fast_encoder,
                  tokenizer_path=tokenizer_path)
    return run_job(job, executor or ExecutorConfig(workers=num_proc, progress=progress), keep_work, upload_to)
