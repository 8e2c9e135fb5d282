"""`fuxi data tokenizer` as a job of the data engine (job.py): one task (BPE training is one process with
threads), so on a cluster it is one job in the chain, and a finished training is not redone by a re-run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fuxi.data_pipeline import remote
from fuxi.data_pipeline.engine import ExecutorConfig, Stage
from fuxi.data_pipeline.job import FinishStep, Job, run_job
from fuxi.data_pipeline.tokenizer import META_FILE, TOKENIZER_FILES, TokenizerConfig, train_tokenizer


class TrainTokenizer(FinishStep):
    """Train, and switch the new tokenizer folder (its metadata file records the job hash) into place."""

    name = "tokenizer"

    def describe(self, rank: int, world_size: int) -> str:
        return self.job.corpus

    def finish(self) -> None:
        train_tokenizer(self.job.corpus, self.job.out_dir, self.job.config, job=self.job_hash)


@dataclass
class TokenizerJob(Job):
    name: ClassVar[str] = "tokenizer"
    record: ClassVar[str] = META_FILE

    corpus: str
    config: TokenizerConfig

    def inputs(self) -> list[str]:
        return [self.corpus]

    def owned(self) -> tuple[str, ...]:
        return TOKENIZER_FILES

    def stages(self, job_hash: str, tasks: int) -> list[Stage]:
        return [Stage("tokenizer", TrainTokenizer(self, job_hash), 1, parallel=False)]

    def result(self) -> Path:
        return self.out_dir


def train_tokenizer_task(corpus: str | Path, out_dir: str | Path, config: TokenizerConfig | None = None,
                         executor: ExecutorConfig | None = None,
                         work_dir: str | Path | None = None) -> Path | None:
    """Train the tokenizer through the engine; its path, or None when the task was submitted to a cluster.
    work_dir: the task's logs and completion marker (default: `.<out>.work` beside the output). corpus and
    out_dir may be URLs (`s3://...`): the trainer reads a local copy and the files are uploaded after it
    (remote.py); the path returned is then the local copy."""
    config = config or TokenizerConfig()
    config.validate()
    local_out, upload_to = remote.local_output(out_dir)
    job = TokenizerJob(out_dir=local_out, work_dir=work_dir, corpus=str(remote.local_input(corpus).absolute()),
                       config=config)
    return run_job(job, executor or ExecutorConfig(), upload_to=upload_to)
