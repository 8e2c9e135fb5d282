"""launch/train_multi_node.sh as two "nodes" on this machine: started twice (NNODES=2, one rank each, torchrun's
c10d rendezvous on localhost), as a cluster without Slurm runs it. The pair trains, checkpoints the last
finished step when each node's process group gets SIGTERM, and the same two commands resume it bitwise: every
step's loss equals a 2-rank run never stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from trainer_helpers import (REPO, free_port, run_config, run_pretrain, subprocess_env, tiny_training_dataset,
                             train_losses, wait_for_steps, write_config)

SCRIPT = REPO / "launch" / "train_multi_node.sh"
SCHEDULE = {"total_steps": 400, "warmup_steps": 0, "min_lr_ratio": 1.0, "global_batch": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def start_nodes(config, port, *overrides):
    """Both nodes' commands, each in its own session (a node's process group: torchrun, its rank, workers)."""
    env = {**subprocess_env(), "NNODES": "2", "NPROC": "1", "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(port),
           "RUN_ID": f"two-nodes-{port}", "PYTHON": sys.executable}
    return [subprocess.Popen(["bash", str(SCRIPT), str(config), *[f"--set={o}" for o in overrides]], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for _ in range(2)]


def finish(nodes, timeout=240):
    results = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for n in nodes:
                os.killpg(n.pid, signal.SIGKILL)
            raise
        results.append((node.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_nodes_on_localhost_checkpoint_on_sigterm_and_resume_bitwise(data, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(data, out, schedule=SCHEDULE, data={"num_workers": 2}, checkpoint={"every_steps": 1000},
                     parallelism={"zero_stage": 1, "micro_batch": 2, "precision": "fp32"})
    config = write_config(cfg, tmp_path / "run.yaml")
    nodes = start_nodes(config, free_port())
    wait_for_steps(nodes[0], out / "metrics.jsonl", 3)
    for node in nodes:  # what a scheduler does on each node
        os.killpg(node.pid, signal.SIGTERM)
    results = finish(nodes)
    for code, stdout, stderr in results:
        assert code == 128 + signal.SIGTERM, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert (out / "checkpoints" / latest / "COMPLETE").is_file()
    assert max(train_losses(out)) == step
    assert sorted(p.name for p in (out / "checkpoints" / latest).glob("rank_*.pt")) == ["rank_00000.pt",
                                                                                       "rank_00001.pt"]
    reported = "".join(stdout for _, stdout, _ in results)
    assert f"preempted, checkpoint written at step {step}" in reported

    total = f"schedule.total_steps={step + 3}"
    results = finish(start_nodes(config, free_port(), total))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert f"resumed from {out / 'checkpoints' / latest} at step {step}" in "".join(e for _, _, e in results)
    reference_dir = tmp_path / "reference"
    reference = write_config({**cfg, "run": {**cfg["run"], "output_dir": str(reference_dir)}},
                             tmp_path / "reference.yaml")
    run_pretrain(reference, nproc=2, overrides=(total,))
    resumed, uninterrupted = train_losses(out), train_losses(reference_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, step + 4))
    for s in uninterrupted:
        assert resumed[s] == uninterrupted[s], (s, resumed[s], uninterrupted[s])
