"""The GPU check (launch/gpu_check.sh): its dry run on CPU end to end, so that the script a GPU session runs once
cannot rot, plus the parts that decide what a real run reports (time boxes, killed steps, goals, layer fit)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuxi.launch import gpu_check
from fuxi.launch.gpu_check_report import GOALS, evaluate_goals, markdown_report

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # its own budget (1500 s) rules, not the suite's --timeout 900
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--dry-run", "--budget", "1500"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "gpu_check.json").read_text())

    assert summary["gpu_check"] == "ok" and summary["dry_run"] is True
    assert report["schema"] == gpu_check.SCHEMA and report["status"] == "ok"
    assert list(report["steps"]) == [s.name for s in gpu_check.STEPS]
    carried = sorted((REPO / ".whl").glob("*.whl"))
    for name, step in report["steps"].items():
        if name == "wheels" and not carried:
            assert step["status"] == "skipped" and step["skipped_for"] == "nothing to do"
            continue
        assert step["status"] == "ok", (name, step)
        assert 0 < step["seconds"] <= step["timeout_s"]
        assert isinstance(step["result"], dict), name
    if carried:  # installed for the GPU machine's Python 3.12 (tags checked), not put on this one's path
        installed = report["steps"]["wheels"]["result"]["installed"]
        assert len(installed) == len(carried) and any(d.startswith("deepspeed-") for d in installed)
    steps = {name: step["result"] for name, step in report["steps"].items()}
    assert steps["env"]["missing"] == [] and report["machine"]["python"]
    assert "collected" in steps["pytest_gpu"]["collected"]
    assert {r["provider"] for r in report["steps"]["bench_kernels"]["rows"]} >= {"eager", "triton"}
    assert {r["kernel"] for r in report["steps"]["bench_kernels"]["rows"]} == \
        {"rms_norm", "bias_gelu", "swiglu", "rope"}
    assert {r["provider"] for r in report["steps"]["bench_flce"]["rows"]} >= {"eager", "chunked_torch", "triton"}
    assert steps["bench_train"]["kernels"] == "triton" and steps["bench_train"]["tokens_per_s"] > 0
    assert steps["bench_train_ac"]["activation_checkpointing"] is True
    assert [r["variant"] for r in steps["bench_moe"]["rows"]] == ["loop", "grouped_mm"]
    assert steps["bench_ghostgru"]["impl"] == "triton"
    # The interpreter's Triton kernels train exactly like the torch path in fp32.
    assert steps["pretrain_sanity"]["passed"] and steps["pretrain_sanity"]["max_rel_diff_first_steps"] < 1e-4
    assert set(report["goals"]) == set(GOALS) and all(g["met"] is None for g in report["goals"].values())
    for name in ("gpu_check.json", "gpu_check.log", "gpu_check.md", "kernels.png", "flce.png",
                 "pretrain_sanity.png"):
        assert (out / name).stat().st_size > 0 and name in report["files"]
    assert len(report["files"]) <= 8  # the device tool returns at most 8 files from $OUT
    assert "DRY RUN" in (out / "gpu_check.md").read_text()
    # Streamed rows and the bf16 correctness checks (tiny shapes on CPU), with the loss's grad_hidden path.
    assert [r["variant"] for r in report["steps"]["bench_moe"]["rows"]] == ["loop", "grouped_mm"]
    assert len(report["steps"]["bench_ghostgru"]["rows"]) == len(steps["bench_ghostgru"]["rows"])
    phases = [r["phase"] for r in report["steps"]["bench_train"]["rows"]]
    assert phases[0] == "warmup" and phases.count("timed") == len(steps["bench_train"]["step_times_s"])
    checks = {c["check"]: c for c in report["correctness"]}
    moe_checks = [c for c in checks if c.startswith("moe grouped_mm vs loop")]
    flce_checks = [c for c in checks if c.startswith("flce triton vs eager")]
    assert len(moe_checks) == 2 and len(flce_checks) == 3, sorted(checks)
    for name in moe_checks + flce_checks:
        assert checks[name]["passed"] is True and checks[name]["dtype"] == "bfloat16", checks[name]
        assert 0 < checks[name]["max_abs_err"] <= checks[name]["bound"]
    assert checks[moe_checks[1]]["same_routing"]
    assert {"input", "router.weight", "experts.0.up_proj.bias", "experts.3.down_proj.weight"} <= \
        set(checks[moe_checks[1]]["tensors"])
    assert checks["flce triton vs eager, grad_hidden"]["path"] == \
        "bf16 fallback (torch's out_dtype mm has no cpu kernel)"
    assert checks["pytest -m gpu (dry run: collected only)"]["tests"] > 0
    assert summary["correctness"][moe_checks[1]] is True
    assert report["git"]["source"] == "git" and len(report["git"]["commit"]) == 40
    assert "#### Correctness" in (out / "gpu_check.md").read_text()
    assert "===== pretrain_sanity: ok" in (out / "gpu_check.log").read_text()


def _step(name: str, code: str, cap: int = 30) -> gpu_check.Step:
    return gpu_check.Step(name, name, cap, 1, lambda ctx: [sys.executable, "-c", code])


def _context(tmp_path) -> gpu_check.Context:
    return gpu_check.Context(True, tmp_path, tmp_path, sys.executable, dict(os.environ), {})


def test_a_hung_step_is_killed_with_its_children_and_a_failing_one_reported(tmp_path):
    ctx = _context(tmp_path)
    log = open(tmp_path / "log", "w")
    # The step's child sleeps too: the whole process group must go, or the pipe never closes.
    hung = _step("hung", "import subprocess, sys, time; print('started', flush=True); "
                         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    record = gpu_check.run_step(hung, ctx, timeout=3, log=log)
    assert record["status"] == "timeout" and record["seconds"] < 30 and "started" in record["tail"]
    failing = _step("failing", "import json; print(json.dumps({'partial': 1})); raise SystemExit('boom')")
    record = gpu_check.run_step(failing, ctx, timeout=30, log=log)
    assert record["status"] == "failed" and record["returncode"] == 1
    assert record["result"] == {"partial": 1} and any("boom" in line for line in record["tail"])
    log.close()
    assert "===== hung: timeout" in (tmp_path / "log").read_text()


def test_a_step_killed_at_its_time_box_keeps_the_rows_it_printed(tmp_path):
    """Benches print each result as a JSON line when measured (kernels.bench.print_row): a step that prints
    two rows and a check, then hangs, is killed at its cap and its record still holds all three."""
    ctx = _context(tmp_path)
    code = ("import json, time\n"
            "from fuxi.kernels.bench import print_row\n"
            "print_row({'variant': 'loop', 'fwd_ms': 1.5})\n"
            "print('a table line', flush=True)\n"
            "print_row({'variant': 'grouped_mm', 'fwd_ms': 0.5})\n"
            "print_row({'check': 'toy', 'passed': True}, key='check')\n"
            "time.sleep(60)\n"
            "print(json.dumps({'never': 'printed'}))\n")
    with open(tmp_path / "log", "w") as log:
        record = gpu_check.run_step(_step("slow", code), ctx, timeout=6, log=log)
    assert record["status"] == "timeout" and record["seconds"] < 30
    assert record["rows"] == [{"variant": "loop", "fwd_ms": 1.5}, {"variant": "grouped_mm", "fwd_ms": 0.5}]
    assert record["checks"] == [{"check": "toy", "passed": True}] and record["result"] is None
    failed = {"slow": {**record, "checks": [{"check": "toy", "passed": False}]}}
    assert gpu_check.correctness(failed) == [{"step": "slow", "check": "toy", "passed": False}]


def test_pytest_counts_come_from_its_closing_line(tmp_path):
    lines = ["tests/test_model.py::test_x PASSED", "tests/test_model.py::test_y FAILED",
             "=========== 1 failed, 19 passed, 2 skipped, 3 warnings in 41.20s ==========="]
    assert gpu_check.pytest_summary(lines) == {"passed": 19, "failed": 1, "errors": 0, "skipped": 2, "warnings": 3,
                                               "summary": "1 failed, 19 passed, 2 skipped, 3 warnings in 41.20s"}
    assert gpu_check.pytest_summary(["== 1 error in 3.0s =="])["errors"] == 1
    assert gpu_check.pytest_summary(lines[:2]) is None  # killed before pytest summed up
    import re
    assert re.search(gpu_check.PYTEST_LINE, lines[2]) and re.search(gpu_check.PYTEST_LINE, lines[0])
    # Killed: the verbose lines are counted and the run is not called passed.
    ctx = gpu_check.Context(False, tmp_path, tmp_path, sys.executable, {}, {})
    record = {"lines": lines[:2]}
    gpu_check.pytest_after(ctx, record)
    assert record["result"]["tests"] == 2 and record["result"]["incomplete"]
    [entry] = gpu_check.correctness({"pytest_gpu": record})
    assert entry["passed"] is False and entry["failed"] == 1 and entry["passed_tests"] == 1


def test_the_commit_comes_from_git_or_from_the_carried_stamp(tmp_path, monkeypatch):
    """The device machine's copy has no .git: `make gpu-stamp` writes the commit into .whl/COMMIT, which is
    carried; without either the report says unknown and why."""
    here = gpu_check.git_state()
    assert here["source"] == "git" and len(here["commit"]) == 40
    monkeypatch.setattr(gpu_check, "COMMIT_STAMP", tmp_path / ".whl" / "COMMIT")
    gpu_check.stamp_commit()
    stamp = json.loads((tmp_path / ".whl" / "COMMIT").read_text())
    assert stamp["commit"] == here["commit"] and stamp["dirty"] == here["dirty"] and stamp["stamped"]
    copy = tmp_path / "copy"  # a working tree without .git, as the device tool sends it
    (copy / ".whl").mkdir(parents=True)
    monkeypatch.setattr(gpu_check, "REPO", copy)
    monkeypatch.setattr(gpu_check, "COMMIT_STAMP", copy / ".whl" / "COMMIT")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    unknown = gpu_check.git_state()
    assert unknown["commit"] == "unknown" and "make gpu-stamp" in unknown["source"]
    assert gpu_check.commit_label(unknown) == "unknown"
    (copy / ".whl" / "COMMIT").write_text(json.dumps(stamp))
    carried = gpu_check.git_state()
    assert carried["commit"] == here["commit"] and carried["source"] == ".whl/COMMIT"
    assert gpu_check.commit_label(carried).startswith(here["commit"][:12])


def test_time_boxes_keep_the_minimum_of_later_steps():
    steps = [gpu_check.Step(n, n, cap, low, lambda ctx: None) for n, cap, low in
             (("a", 100, 30), ("b", 60, 20), ("c", 50, 40))]
    assert gpu_check.time_box(steps, 0, left=480) == 100
    assert gpu_check.time_box(steps, 0, left=120) == 60            # 60 kept for b and c
    assert gpu_check.time_box(steps, 0, left=80) == 0               # cannot get its own 30 s
    assert gpu_check.time_box(steps, 2, left=45) == 45
    assert gpu_check.time_box(steps, 0, left=1000, slack=3) == 300  # dry run: caps x 3


def test_goals_read_the_step_results():
    steps = {"bench_train": {"result": {"mfu": 0.47}},
             "bench_kernels": {"result": {"rms_norm_triton_pct_bw": 71.0, "rms_norm_speedup_vs_compile": 1.3}},
             "bench_flce": {"result": {"flce_peak_mem_ratio": 0.05, "flce_time_ratio": 1.2}},
             "pretrain_sanity": {"result": {"passed": True}}}
    goals = evaluate_goals(steps, dry_run=False)
    assert goals["mfu_8b_layers"]["met"] is True
    assert goals["rms_norm_pct_bw"]["met"] is False and goals["rms_norm_faster_than_compile"]["met"] is True
    assert goals["flce_peak_mem_vs_eager"]["met"] is True and goals["flce_time_vs_eager"]["met"] is False
    assert goals["rope_pct_bw"]["met"] is None and goals["pretrain_gpu_matches_cpu"]["met"] is True
    assert all(g["met"] is None for g in evaluate_goals(steps, dry_run=True).values())
    report = {"dry_run": False, "steps": {k: {"title": k, "status": "ok", "seconds": 1.0, **v}
                                          for k, v in steps.items()}, "goals": goals, "machine": {}}
    text = markdown_report(report)
    assert "| mfu_8b_layers | 0.47 | >= 0.45 | yes |" in text and "| rms_norm_pct_bw | 71 | >= 80.0 | **no** |" in text


def test_layers_that_fit_an_h100_and_an_h200():
    """8B widths (201,371,648 parameters per layer; embedding + LM head + norm 2,053,595,136 at V 250,752):
    24 bytes per parameter (ZeRO-2 AdamW: 16, DeepSpeed's fp32 gradient partition 4, foreach AdamW's fp32
    temporaries 4) plus 40 bytes per token and unit of activations, 4 GB reserved."""
    from fuxi.pretrain import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--hidden", "4096", "--heads", "32", "--ffn", "16384", "--vocab", "250680",
                              "--seq-len", "4096", "--micro-batch", "1"])
    per_layer = 24 * 201_371_648 + 40 * 4096 * 4096
    fixed = 24 * (2 * 250_752 * 4096 + 4096) + 4e9 + 40 * 4096 * 4096
    for memory in (0.9 * 85.0e9, 0.9 * 150.7e9):
        fit = bench.layers_that_fit(args, memory)
        assert fit["layers"] == int((memory - fixed) // per_layer)
    assert bench.STEP_BYTES_PER_PARAM == 24
    assert bench.layers_that_fit(args, 0.9 * 85.0e9)["layers"] == 4
    assert bench.layers_that_fit(args, 0.9 * 150.7e9)["layers"] == 14
    assert bench.layers_that_fit(args, 1e9)["layers"] == 1  # never fewer than one


def test_carried_bytes_count_what_the_device_tool_sends(tmp_path, monkeypatch):
    """Tracked and untracked files count, git-ignored ones do not, except the carried .whl/; and this
    checkout itself fits the limit."""
    assert 0 < gpu_check.carry_size_bytes()["tree_bytes"] < gpu_check.CARRY_LIMIT_BYTES
    repo = tmp_path / "repo"
    (repo / ".whl").mkdir(parents=True)
    (repo / "runs").mkdir()
    sizes = {"tracked.py": 1000, "untracked.txt": 300, ".gitignore": None, "runs/big.bin": 5000,
             ".whl/a-1.0-py3-none-any.whl": 7000}
    (repo / ".gitignore").write_text("runs/\n.whl/\n")
    for name, n in sizes.items():
        if n is not None:
            (repo / name).write_bytes(b"x" * n)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "tracked.py", ".gitignore"], cwd=repo, check=True)
    monkeypatch.setattr(gpu_check, "REPO", repo)
    size = gpu_check.carry_size_bytes()
    assert size["tree_bytes"] == 1000 + 300 + len("runs/\n.whl/\n")
    assert size["wheels_bytes"] == 7000 and size["total_bytes"] == size["tree_bytes"] + 7000


def test_an_out_of_memory_step_is_retried_with_its_retry_command(tmp_path, monkeypatch):
    """bench_train's layer fit is an estimate: an OOM gets one more attempt (planning for less memory)."""
    fails = [sys.executable, "-c", "print('torch.OutOfMemoryError: CUDA out of memory'); raise SystemExit(1)"]
    works = [sys.executable, "-c", "import json; print(json.dumps({'layers': 5}))"]
    step = gpu_check.Step("bench_train", "train", 30, 1, lambda ctx: fails, retry_on=gpu_check.OOM,
                          retry_argv=lambda ctx: works)
    other = _step("bench_moe", "raise SystemExit(3)")  # fails without the OOM text: no retry
    monkeypatch.setattr(gpu_check, "STEPS", [step, other])
    args = argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), dry_run=True, budget=200,
                              only=None, argv_echo=["--dry-run"])
    report = gpu_check.run_check(args)
    train, moe = report["steps"]["bench_train"], report["steps"]["bench_moe"]
    assert train["status"] == "ok" and train["result"] == {"layers": 5}
    assert train["first_attempt"]["status"] == "failed" and "OutOfMemoryError" in train["first_attempt"]["tail"][0]
    assert moe["status"] == "failed" and "first_attempt" not in moe
    assert report["status"] == "failed"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]["bench_train"]["status"] == "ok"


def test_caps_sum_within_the_budget_and_never_measured_steps_come_first():
    names = [s.name for s in gpu_check.STEPS]
    assert sum(s.cap_s for s in gpu_check.STEPS) <= gpu_check.GPU_BUDGET_S == 510
    assert all(s.min_s <= s.cap_s for s in gpu_check.STEPS)
    assert max(names.index(n) for n in ("bench_moe", "bench_ghostgru", "pytest_gpu")) < \
        min(names.index(n) for n in ("bench_kernels", "bench_flce", "bench_train", "bench_train_ac", "pretrain_sanity"))
    assert gpu_check.DEFAULT_BUDGET_S[True] == gpu_check.DRY_RUN_SLACK * gpu_check.GPU_BUDGET_S


def test_the_budget_counts_from_the_shell_scripts_start(monkeypatch):
    monkeypatch.setenv(gpu_check.T0_ENV, str(time.time() - 42))
    assert 42 <= gpu_check.seconds_since_start() < 52
    monkeypatch.delenv(gpu_check.T0_ENV)
    # Without the script: since this process started, which was before this test ran.
    assert gpu_check.seconds_since_start() > 0
    monkeypatch.setenv(gpu_check.T0_ENV, "soon")
    with pytest.raises(SystemExit, match="FUXI_GPU_CHECK_T0='soon'"):
        gpu_check.seconds_since_start()
