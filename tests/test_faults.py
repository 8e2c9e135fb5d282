"""Faults a cluster delivers, each ending promptly in one line with nothing lost: an error raised while DataLoader
workers run, a rank SIGKILLed under torchrun, a full disk during a checkpoint save, during `fuxi data pack` and
during `fuxi convert to-hf`, an interrupted deletion of an old checkpoint, and torchrun restarting the ranks
(`MAX_RESTARTS`). A full disk is a small tmpfs (root only; the test says why it skips elsewhere)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuxi.common.diskspace import tree_bytes
from trainer_helpers import (REPO, pretrain_command, rank_pids, run_config, run_pretrain, start_in_session,
                             subprocess_env, tiny_training_dataset, train_losses, wait_for_steps, write_config)

# A constant LR (no warmup, floor = peak): a run's losses do not depend on schedule.total_steps.
SCHEDULE = {"total_steps": 8, "warmup_steps": 0, "min_lr_ratio": 1.0, "global_batch": 4}
HANG = 120  # seconds: far beyond what any of these runs needs, far below torchrun's shutdown timeout (300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def disk_config(dataset, out, **sections):
    """8 steps, a checkpoint every 2, two kept."""
    return run_config(dataset, out, schedule=SCHEDULE, checkpoint={"every_steps": 2, "keep_last": 2}, **sections)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 1-rank run of `disk_config` on a roomy disk: its output folder (checkpoints of steps 6
    and 8)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_pretrain(write_config(disk_config(data, out), out.parent / "run.yaml"))
    return out


def finish(process, what: str) -> tuple[str, str]:
    """(stdout, stderr) of a started job; a job still running after HANG seconds hangs, which fails the test."""
    try:
        return process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *descendants(process.pid)]:  # torchrun's ranks run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what}: still running after {HANG} s (a hang)\n{stdout[-2000:]}\n{stderr[-4000:]}")


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                children = [int(child) for child in task.read_text().split()]
                found += children
                pending += children
    return found


def assert_group_gone(pgid: int, within: float = 10.0) -> None:
    """No process of the job's session is left (DataLoader workers included)."""
    deadline = time.time() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.time() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail(f"processes of group {pgid} outlived the job")
        time.sleep(0.1)


def error_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def bytes_in(text: str) -> float:
    """'254.4 KB' -> 254400 (common/diskspace.size_text's powers of 1000)."""
    number, unit = text.split()
    return float(number) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(unit)


def files_under(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- an error with DataLoader workers, a rank that dies ----------------------------------------------------

@pytest.mark.slow
def test_an_error_in_a_dataloader_worker_exits_at_once_with_its_one_line_error(data, tmp_path):
    """A shard whose bytes changed (same size), on_error: raise, 2 workers: the worker's ShardError ends the run
    with exit status 2 and that error's own line, and no process is left (the workers ignore SIGTERM, and
    Python's exit used to wait for them forever)."""
    from fuxi.data_pipeline.errors import ShardError
    from fuxi.data_pipeline.manifest import load_manifest
    from fuxi.data_pipeline.shards import ShardReader

    shards = tmp_path / "shards"
    shutil.copytree(data.train_manifest.parent, shards)
    manifest = load_manifest(shards / "manifest.json")
    expected = set()
    for shard in manifest.shards:  # every shard, so the first one a worker opens is bad
        path = manifest.shard_path(shard)
        raw = bytearray(path.read_bytes())
        start_at = raw.index(b"\x93NUMPY")
        raw[start_at + 10:start_at + 20] = b"#" * 10
        path.write_bytes(bytes(raw))
        with pytest.raises(ShardError) as err:  # what reading it in this process says
            ShardReader(manifest, shard, verify_checksum=True, on_error="raise")
        expected.add(f"fuxi pretrain: error: {err.value}")
    out = tmp_path / "run"
    config = write_config(run_config(data, out, data={"train_manifest": str(shards / "manifest.json"),
                                                      "num_workers": 2, "on_error": "raise"}), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config))
    _, stderr = finish(process, "fuxi pretrain after a worker's ShardError")
    assert process.returncode == 2, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] in expected, stderr[-3000:]
    assert "Traceback" not in stderr
    assert_group_gone(process.pid)


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_ends_the_launcher_within_seconds(data, tmp_path):
    """2 ranks with 2 workers each; rank 1 SIGKILLed mid-run. Its workers die with it, the survivor's collective
    fails at once, it exits (its workers ended), and so does torchrun: within seconds, not after the 30 s torch
    2.13's agent gives the other ranks when one failed (its fixed `_shutdown` timeout: `--shutdown-timeout`, 300
    s in launch.torchrun, applies only when torchrun itself is signalled), the time a survivor stuck joining its
    workers at exit used to take."""
    import inspect

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    assert inspect.signature(LocalElasticAgent._shutdown).parameters["timeout"].default == 30
    out = tmp_path / "run"
    config = write_config(run_config(data, out, schedule={**SCHEDULE, "total_steps": 400},
                                     data={"num_workers": 2}, checkpoint={"every_steps": 1000}), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config, nproc=2))
    wait_for_steps(process, out / "metrics.jsonl", 3)
    ranks = rank_pids(process.pid)
    assert sorted(ranks) == [0, 1], ranks
    killed = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = finish(process, "torchrun after a rank was killed")  # returns once every process left its pipes
    elapsed = time.time() - killed
    assert process.returncode != 0
    assert elapsed < 15, (elapsed, stderr[-3000:])
    assert_group_gone(process.pid)


# ---- a full disk during a checkpoint save ------------------------------------------------------------------

def test_a_full_disk_is_told_through_the_errors_that_wrap_it(small_disk):
    """Real writes on a full tmpfs: torch.save through a file (how checkpoints are written), safetensors'
    save_file and a plain write say the disk is full through what wraps their errors; torch.save to a path
    cannot (it keeps neither the errno nor the text), and other write errors are not a full disk."""
    import torch
    from safetensors.torch import save_file

    from fuxi.common.diskspace import is_disk_full
    from fuxi.pretrain.checkpointing import save_torch

    disk = small_disk(64 << 10)
    tensors = {"w": torch.zeros(64 << 10)}  # 256 KB
    (disk.path / "d").write_text("a file, not a folder")
    with pytest.raises(OSError) as not_a_folder:
        save_torch(tensors, disk.path / "d" / "e")
    told = []
    for write in (lambda: save_torch(tensors, disk.path / "a.pt"), lambda: save_file(tensors, disk.path / "b"),
                  lambda: (disk.path / "c").write_bytes(bytes(1 << 20)), lambda: torch.save(tensors, disk.path / "e")):
        with pytest.raises(Exception) as err:
            write()
        told.append(is_disk_full(err.value))
    assert told == [True, True, True, False]
    assert not is_disk_full(not_a_folder.value) and not is_disk_full(ValueError("no space for doubt"))
    assert not any(p.name.startswith(("a.pt", ".a.pt")) for p in disk.path.iterdir())  # save_torch left no part


@pytest.mark.slow
def test_a_full_disk_during_a_save_says_so_and_the_run_resumes_once_there_is_room(data, reference, tmp_path,
                                                                                  small_disk):
    """Room for two checkpoints (keep_last 2) but not the third that must exist before the oldest goes: the save
    of step 6 fails. One line names the folder, the full disk, a checkpoint's size (that of step 4 on disk) and
    keep_last + 1; exit status 2; the partial step 6 is gone and `latest` names the complete step 4. With room
    made, the same command resumes and every step's loss equals the uninterrupted run's."""
    checkpoint = tree_bytes(reference / "checkpoints" / "step_00000008")
    disk = small_disk(int(2.5 * checkpoint) + (256 << 10))
    out = disk.path / "run"
    root = out / "checkpoints"
    config = write_config(disk_config(data, out), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config))
    _, stderr = finish(process, "fuxi pretrain on a full disk")
    assert process.returncode == 2, stderr[-3000:]
    (line,) = error_lines(stderr, "fuxi pretrain: error:")
    assert "Traceback" not in stderr
    assert line.startswith(f"fuxi pretrain: error: checkpoint {root / 'step_00000006'}: the disk is full "
                           f"(No space left on device"), line
    need = re.search(r"a checkpoint needs about (\S+ \S+) \(the size of step_00000004\)", line)
    assert need and abs(bytes_in(need.group(1)) - tree_bytes(root / "step_00000004")) < 1000, line
    assert "checkpoint.keep_last + 1 = 3 of them must fit" in line
    assert "`latest` still names step_00000004" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004",
                                                      "zero_to_fp32.py", "zero_to_torch.py"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert set(files_under(root / "step_00000004")) == set(files_under(reference / "checkpoints" / "step_00000008"))

    (root / ".retired-step_00000001").mkdir()  # what a deletion cut short leaves: the next start removes it
    disk.resize(16 << 20)
    resumed = run_pretrain(config)
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert train_losses(out) == train_losses(reference)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008",
                                                      "zero_to_fp32.py", "zero_to_torch.py"]


@pytest.mark.slow
def test_a_full_disk_at_the_first_save_stops_both_ranks_and_their_workers(data, reference, tmp_path, small_disk):
    """2 ranks with 2 workers each, and room for half a checkpoint: the first save fails. The ranks agree (no
    rank waits at a barrier for one that left), both exit with the same line, whose estimate of a checkpoint
    (no complete one exists yet: from the parameters and optimizer state) is within 15% of a real one, and no
    process, step folder or `latest` is left."""
    checkpoint = tree_bytes(reference / "checkpoints" / "step_00000008")
    disk = small_disk(checkpoint // 2)
    out = disk.path / "run"
    config = write_config(disk_config(data, out, data={"num_workers": 2}), tmp_path / "run.yaml")
    process = start_in_session(pretrain_command(config, nproc=2))
    _, stderr = finish(process, "2 ranks on a full disk")
    assert process.returncode != 0
    lines = error_lines(stderr, "fuxi pretrain: error:")
    assert len(lines) == 2 and lines[0] == lines[1], stderr[-4000:]
    assert f"checkpoint {out / 'checkpoints' / 'step_00000002'}: the disk is full" in lines[0]
    need = re.search(r"a checkpoint needs about (\S+ \S+) \(estimated from the parameters and the optimizer "
                     r"state\)", lines[0])
    assert need and abs(bytes_in(need.group(1)) / checkpoint - 1) < 0.15, (lines[0], checkpoint)
    assert "there is no `latest` yet" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".py")) == []
    assert_group_gone(process.pid)


# ---- retiring old checkpoints ------------------------------------------------------------------------------

def test_an_interrupted_deletion_of_an_old_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Deleting step 1 (keep_last 1) is cut short after one file, as a SIGKILL would cut it: the step folders
    left all hold every file they were written with (a COMPLETE marker still means a complete checkpoint), and
    what is half deleted is a `.retired-` folder, which the next start removes."""
    from fuxi.pretrain import checkpointing
    from fuxi.pretrain.checkpointing import COMPLETE, TAG_PATTERN, CheckpointManager

    root = tmp_path / "checkpoints"
    written = {}
    for step in (1, 2, 3):
        tag = CheckpointManager.tag_for(step)
        names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_00000.pt",
                 COMPLETE]
        (root / tag).mkdir(parents=True)
        for name in names:
            (root / tag / name).write_text(f"{tag} {name}")
        written[tag] = sorted(names)
    (root / "latest").write_text("step_00000003\n")
    manager = CheckpointManager(root, keep_last=1, rank=0)
    real_rmtree = shutil.rmtree

    def cut_short(path, *args, **kwargs):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        if not files:
            return real_rmtree(path, *args, **kwargs)
        files[0].unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        manager._prune(keep="step_00000003")
    monkeypatch.undo()
    for folder in (p for p in root.iterdir() if TAG_PATTERN.match(p.name)):
        if (folder / COMPLETE).is_file():
            assert sorted(p.name for p in folder.iterdir()) == written[folder.name]
    assert sorted(p.name for p in root.iterdir()) == [".retired-step_00000001", "latest", "step_00000002",
                                                      "step_00000003"]
    assert len(list((root / ".retired-step_00000001").iterdir())) == 3  # one of its 4 files went

    CheckpointManager(root, keep_last=1, rank=0)  # a start (of the resumed run) removes the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    CheckpointManager(root, keep_last=1, rank=0)._prune(keep="step_00000003")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]


# ---- restarts ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_max_restarts_restarts_a_killed_rank_and_the_run_resumes_bitwise(data, tmp_path):
    """launch/train_single_node.sh with MAX_RESTARTS=1, 2 ranks with 2 workers each; rank 1 SIGKILLed once a
    checkpoint exists: torchrun restarts both ranks, they resume from `latest` and finish, and every step's
    loss equals an uninterrupted 2-rank run's (torch 2.13's gloo restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE,
    which launch/torchrun.py sets)."""
    def config(out, name):
        return write_config(run_config(data, out, schedule={**SCHEDULE, "total_steps": 40}, data={"num_workers": 2},
                                       checkpoint={"every_steps": 4, "keep_last": 2}), tmp_path / name)

    out = tmp_path / "run"
    env = {**subprocess_env(), "NPROC": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable}
    process = start_in_session(["bash", str(REPO / "launch" / "train_single_node.sh"), str(config(out, "run.yaml"))], env=env)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + HANG
    while not latest.is_file():
        assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
    stdout, stderr = finish(process, "a restarted run")
    assert process.returncode == 0, stderr[-4000:]
    assert re.search(r"resumed from .*step_\d{8} at step \d+", stderr + stdout), stderr[-4000:]
    assert "fuxi pretrain: finished at step 40" in stdout

    reference = tmp_path / "reference"
    run_pretrain(config(reference, "reference.yaml"), nproc=2)
    assert train_losses(out) == train_losses(reference)
    assert sorted(train_losses(out)) == list(range(1, 41))


# ---- a full disk under `fuxi data pack` and `fuxi convert to-hf` -------------------------------------------

def fuxi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuxi.launch.cli", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=HANG)


@pytest.mark.slow
def test_pack_on_a_full_disk_keeps_the_old_shards_and_names_its_resume_state(data, tmp_path, small_disk):
    """`fuxi data pack` of all languages where only the old (English-only) output and part of the new fit: one
    line (no stray traceback from a half-written tar at exit), exit 2, the old shards as they were, and the work
    folder named as the resume state; once there is room, the same command resumes from it and writes the
    shards a pack on a roomy disk writes."""
    corpus = data.train_manifest.parent.parent / "clean" / "train"
    pack = ["data", "pack", str(corpus), str(data.tokenizer_dir), "--seq-len", "32", "--shard-mb", "0.125",
            "--quiet", "--workers", "2"]
    assert fuxi(*pack, str(tmp_path / "english"), "--languages", "en").returncode == 0
    assert fuxi(*pack, str(tmp_path / "all")).returncode == 0
    disk = small_disk(tree_bytes(tmp_path / "english") + tree_bytes(tmp_path / "all") // 2)
    out = disk.path / "shards"
    assert fuxi(*pack, str(out), "--languages", "en").returncode == 0
    old = files_under(out)

    result = fuxi(*pack, str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    work = disk.path / ".shards.work"
    (line,) = result.stderr.strip().splitlines()  # nothing else: no "Exception ignored" at exit
    assert line.startswith(f"fuxi data: error: pack {out}: the disk is full (No space left on device"), line
    assert f"The work done so far is kept in {work}" in line and work.is_dir()
    assert files_under(out) == old
    finished = {shard["path"]: (work / "staging" / shard["path"]).stat().st_ino  # of the parts that finished
                for part in (work / "results").glob("*.json") for shard in json.loads(part.read_text())["shards"]}
    assert finished  # code_python's one part cannot fit, the other task's parts can

    disk.resize(64 << 20)
    result = fuxi(*pack, str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert shards_of(out) == shards_of(tmp_path / "all")
    # the parts finished before the disk filled were kept, not packed again (the same files, moved in)
    assert {name: (out / name).stat().st_ino for name in finished} == finished
    assert not work.exists()


def shards_of(folder) -> tuple[dict, list]:
    """What a pack wrote, less where it was written: each shard's bytes and the manifest's shard entries."""
    tars = {name: digest for name, digest in files_under(folder).items() if name.endswith(".tar")}
    return tars, json.loads((folder / "manifest.json").read_text())["shards"]


@pytest.mark.slow
def test_convert_to_hf_on_a_full_disk_keeps_the_old_export(reference, tmp_path, small_disk):
    """A second export of a training checkpoint where the first one, the consolidated copy and the new one do
    not fit together: one line naming the output and the space the export needs (within 10% of an export's
    size on disk), exit 2, the old export as it was and nothing else left on the disk."""
    convert = ["convert", "to-hf", "--checkpoint", str(reference / "checkpoints"), "--dtype", "float32",
               "--tokenizer", str(tiny_tokenizer(reference))]
    assert fuxi(*convert, "--out", str(tmp_path / "hf")).returncode == 0
    export = tree_bytes(tmp_path / "hf")
    disk = small_disk(int(2.4 * export))
    out = disk.path / "hf"
    assert fuxi(*convert, "--out", str(out)).returncode == 0
    old = files_under(out)

    result = fuxi(*convert, "--out", str(out))
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr, "fuxi convert: error:")  # above it: DeepSpeed's progress bar
    assert "Traceback" not in result.stderr
    assert line.startswith(f"fuxi convert: error: convert to-hf {out}: the disk is full (No space left on device")
    need = re.search(r"the export needs about (\S+ \S+) \(58,080 parameters in float32 and the tokenizer\)", line)
    assert need and abs(bytes_in(need.group(1)) / export - 1) < 0.1, (line, export)
    assert f"{out} is as it was" in line
    assert files_under(out) == old
    assert sorted(p.name for p in disk.path.iterdir()) == ["hf"]


def tiny_tokenizer(run_dir):
    import yaml

    return yaml.safe_load((run_dir.parent / "run.yaml").read_text())["data"]["tokenizer"]
