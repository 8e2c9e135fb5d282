"""`fuxi data tokenizer` as a task of the data engine: one task (BPE training is one process with threads), so
on a cluster it is one job in the chain, and a finished training is not redone by a re-run."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from fuxi.data_pipeline.engine import (ExecutorConfig, Stage, TaskStep, default_work_dir, prepare_work_dir,
                                  run_stages)
from fuxi.data_pipeline.io_utils import input_stamp
from fuxi.data_pipeline.tokenizer import META_FILE, TokenizerConfig, train_tokenizer


class TrainTokenizer(TaskStep):
    name = "tokenizer"

    def __init__(self, corpus: str, out_dir: str, config: TokenizerConfig, job: str):
        super().__init__()
        self.corpus = corpus
        self.out_dir = out_dir
        self.config = config
        self.job = job

    def describe(self, rank: int, world_size: int) -> str:
        return self.corpus

    def run_task(self, rank: int, world_size: int) -> None:
        train_tokenizer(self.corpus, self.out_dir, self.config, job=self.job)


def train_tokenizer_task(corpus: str | Path, out_dir: str | Path, config: TokenizerConfig | None = None,
                         executor: ExecutorConfig | None = None,
                         work_dir: str | Path | None = None) -> Path | None:
    """Train the tokenizer through the engine; its path, or None when the task was submitted to a cluster.
    work_dir: the task's logs and completion marker (default: `.<out>.work` beside the output)."""
    config = config or TokenizerConfig()
    config.validate()
    executor = executor or ExecutorConfig()
    out_dir = Path(out_dir).absolute()
    work = Path(work_dir).absolute() if work_dir else default_work_dir(out_dir)
    corpus = Path(corpus).absolute()
    identity = {"stage": "tokenizer", "config": vars(config), "corpus": input_stamp([corpus])}
    job = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    meta = out_dir / META_FILE
    if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("job") == job:
        return out_dir  # trained from the same corpus with the same settings
    prepare_work_dir(work, identity)
    step = TrainTokenizer(str(corpus), str(out_dir), config, job)
    if not run_stages([Stage("tokenizer", step, 1, parallel=False)], work, executor):
        return None
    shutil.rmtree(work, ignore_errors=True)
    return out_dir
