"""Run `fuxi pretrain` on a tiny model and a tiny slice of the bundled corpus, in-process or as subprocesses
(1 process or 2 torchrun ranks with gloo)."""
from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ["en", "zh", "ru", "code_python"]


def tiny_training_dataset(tmp_path_factory):
    """Tokenizer + train/valid shards for four languages of the bundled corpus (cached per test process)."""
    from data_helpers import tiny_dataset

    return tiny_dataset(tmp_path_factory, vocab_size=512, seq_len=32, max_docs_per_language=12,
                        languages=LANGUAGES)


def run_config(dataset, out_dir: Path, **sections) -> dict:
    """A complete run config as a dict; `sections` override whole keys, e.g. schedule={...}."""
    cfg = {
        "stage": "pretrain",
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 128,
                  "max_seq_len": 32, "kernels": "torch"},
        "data": {"train_manifest": str(dataset.train_manifest), "val_manifest": str(dataset.val_manifest),
                 "seq_len": 32, "num_workers": 0, "seed": 0, "tokenizer": str(dataset.tokenizer_dir)},
        "optimizer": {"lr": 1e-2},
        "schedule": {"total_steps": 8, "warmup_steps": 2, "global_batch": 4},
        "parallelism": {"zero_stage": 1, "micro_batch": 2, "precision": "fp32"},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"every_steps": 1, "val_every_steps": 1000, "val_batches_per_language": 1, "tensorboard": False},
        "run": {"output_dir": str(out_dir), "seed": 7},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def pretrain_command(config: Path, nproc: int = 1, overrides: tuple[str, ...] = ()) -> list[str]:
    tail = ["-m", "fuxi.launch.cli", "pretrain", "--config", str(config), *[f"--set={o}" for o in overrides]]
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "fuxi.launch.torchrun", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *tail]


def run_pretrain(config: Path, nproc: int = 1, overrides: tuple[str, ...] = (), timeout: int = 300):
    result = subprocess.run(pretrain_command(config, nproc, overrides), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"fuxi pretrain failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_losses(output_dir: Path) -> dict[int, float]:
    """step -> logged loss; a resumed run appends, so the last record of a step wins."""
    losses = {}
    with open(output_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                losses[record["step"]] = record["loss"]
    return losses


def wait_for_steps(process, metrics, steps, timeout=240):
    """Wait until `metrics` (metrics.jsonl) holds `steps` training records; fail if the process exits first."""
    start_time = time.time()
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= steps):
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"training exited early ({process.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        if time.time() - start_time > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.1)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the ranks a torchrun launcher started (its children, by their RANK variable)."""
    children = [int(pid) for task in Path(f"/proc/{launcher_pid}/task").glob("*/children")
                for pid in task.read_text().split()]
    ranks = {}
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:  # exited meanwhile
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in variables:
            ranks[int(variables[b"RANK"])] = pid
    return ranks


def start_in_session(command, env=None, cwd=REPO) -> subprocess.Popen:
    """A new session, so the job has its own process group as under a scheduler."""
    return subprocess.Popen(command, cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
