"""The GPU check: every GPU-only test and benchmark of the project in one time-boxed command.

`bash launch/gpu_check.sh` runs `python -m fuxi.launch.gpu_check` with the GPU machine's python3 (docs/benchmarks.md,
"GPU check"). Steps, in order, each a subprocess in its own process group with its own time box, so that a
slow or hung step is killed and the rest still run:

    wheels           install the carried .whl/ (pip --target, no network); later steps get it on PYTHONPATH
    env              versions, device, and whether every package our code imports is there
    bench_moe        d. the MoE layer: grouped GEMM vs a loop over experts
    bench_ghostgru   d. the GhostGRU Triton kernel vs cuDNN's GRU
    pytest_gpu       a. pytest -m gpu (bf16 kernels under FlashAttention's rule, MoE permutation, GhostGRU, model)
    bench_kernels    b. RMSNorm, bias-GELU, SwiGLU, RoPE at the 8B widths: eager, torch.compile, Triton, Liger
    bench_flce       b. the fused linear cross-entropy at V 250,752 and 8,192 tokens: peak memory and speed
    bench_train      c. 8B-shaped layers, as many as fit, ZeRO-2, bf16: tokens/s, TFLOP/s, MFU, peak memory
    bench_train_ac   c. the same layers with activation checkpointing
    pretrain_sanity  e. 20 steps of `fuxi pretrain` on the GPU (bf16) against the same run on CPU (fp32)

The never-measured steps (MoE, GhostGRU, the GPU tests) come first. The caps sum to the 510 s budget, which
counts from the start of launch/gpu_check.sh (FUXI_GPU_CHECK_T0), not from this module's imports.
A step's time box is its cap, shortened when the budget left must still cover the minimum of the steps after
it; a step that cannot get its minimum is skipped. gpu_check.json (rewritten after every step, so a killed run
still leaves its results), gpu_check.log, gpu_check.md (the rows for docs/benchmarks.md) and the PNGs go to
--out; the last printed line is one JSON object. Every bench prints each result as one JSON line when it is
measured ({"row": ...}, and {"check": ...} for the bf16 correctness checks: MoE grouped GEMM vs the expert loop,
the fused loss vs eager); the step's record collects them as they come ("rows", "checks"), so a step killed at
its time box keeps what it finished. "correctness" gathers the checks and the GPU tests' counts; a failed check
fails the run. The commit comes from git, or on the device machine (no .git) from .whl/COMMIT (make gpu-stamp).
`--dry-run` runs the same steps on a CPU at tiny shapes with Triton under the interpreter
(tests/test_gpu_check.py), so the script cannot rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fuxi.common.atomic import write_json, write_text

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
GPU_BUDGET_S = 510  # a device call of at most 560 s: 50 s for the shell, start-up and writing back
DRY_RUN_SLACK = 3  # a dry run's time boxes: the GPU's x 3 (a shared 2-core CI machine, the interpreter)
DEFAULT_BUDGET_S = {False: GPU_BUDGET_S, True: DRY_RUN_SLACK * GPU_BUDGET_S}
T0_ENV = "FUXI_GPU_CHECK_T0"  # the wall-clock second launch/gpu_check.sh started; the budget counts from it
LOG_BYTES_PER_STEP = 1_500_000  # the device tool returns files of at most 16 MiB, 8 files in all
CARRY_LIMIT_BYTES = 64 * 2**20  # working tree + carried paths per device call
COMMIT_STAMP = REPO / ".whl" / "COMMIT"  # written by `make gpu-stamp`; travels in the carried .whl/
# Imported by our code on the GPU path; the image lacks the ones marked carried (make gpu-wheels).
REQUIRED_MODULES = ["torch", "triton", "numpy", "yaml", "tqdm", "matplotlib", "transformers", "tokenizers",
                    "safetensors", "sentencepiece", "tiktoken", "tensorboard", "pytest",
                    "deepspeed", "webdataset", "datatrove", "loguru", "multiprocess", "py3langid", "pydantic"]
OPTIONAL_MODULES = ["liger_kernel", "flash_attn", "lm_eval"]  # without lm_eval, the gpu eval test is skipped


@dataclass
class Step:
    name: str
    title: str
    cap_s: int                         # time box when the budget allows
    min_s: int                         # reserved for it while earlier steps run
    argv: Callable[["Context"], list[str] | None]
    after: Callable[["Context", dict], None] | None = None   # adds parsed results to the step's record
    keep_lines: str | None = None      # a regex: matching output lines are kept in the record ("lines")
    # A second attempt after a failure whose output matches `retry_on`, if the budget allows: its command.
    retry_on: str | None = None
    retry_argv: Callable[["Context"], list[str]] | None = None


@dataclass
class Context:
    dry_run: bool
    out: Path
    work: Path
    python: str
    env: dict
    records: dict

    def work_dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---- the steps -------------------------------------------------------------------------------------------

def _cli(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "fuxi.launch.cli", *args]


def wheels_argv(ctx: Context) -> list[str] | None:
    wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
    if not wheels:
        return None
    target = ctx.work / "site"
    argv = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "--target", str(target), *wheels]
    if ctx.dry_run:  # for the GPU machine's interpreter, not this one: checks the tags and the layout only
        argv[4:4] = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                     "--platform", "manylinux_2_17_x86_64"]
    return argv


def wheels_after(ctx: Context, record: dict) -> None:
    target = ctx.work / "site"
    on_path = not ctx.dry_run and record["status"] == "ok"
    if on_path:  # every later step imports the carried packages from here, before the image's own
        ctx.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), ctx.env.get("PYTHONPATH")) if p)
    record["result"] = {"installed": sorted(p.name for p in target.glob("*.dist-info")) if target.is_dir() else [],
                        "target": str(target), "on_pythonpath": on_path}
    if record["status"] != "ok" and sys.version_info[:2] != (3, 12):
        record["hint"] = (f"this python is {sys.version_info[0]}.{sys.version_info[1]} and the binary wheels are "
                          "for 3.12: rebuild them with `make gpu-wheels GPU_PYTHON_VERSION=<this version>`")
    if ctx.dry_run and record["status"] == "ok":
        # Where a Python 3.12 exists here, the binary wheels (torch-free ones) must import on it.
        probe = shutil.which("python3.12")
        runs = probe and subprocess.run([probe, "-c", "pass"], capture_output=True, timeout=60).returncode == 0
        if not runs:
            record["result"]["python3.12_import"] = "not checked: no working python3.12 on this machine"
            return
        check = subprocess.run([probe, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import pydantic, "
                                "pydantic_core, hjson, braceexpand; print(pydantic.VERSION)", str(target)],
                               capture_output=True, text=True, timeout=60)
        record["result"]["python3.12_import"] = check.stdout.strip() if check.returncode == 0 \
            else f"failed: {check.stderr.strip()[-300:]}"
        if check.returncode != 0:
            record["status"] = "failed"


def env_argv(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "fuxi.launch.gpu_check", "--env-report"] + (["--dry-run"] if ctx.dry_run else [])


def pytest_argv(ctx: Context) -> list[str]:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    if ctx.dry_run:
        return [ctx.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "--collect-only", *files]
    # -v: one line per finished test, so a run killed at its time box still tells which tests passed.
    return [ctx.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rfE",
            f"--junitxml={ctx.work_dir('pytest_gpu') / 'junit.xml'}", *files]


PYTEST_LINE = (r"(::\S+ (PASSED|FAILED|ERROR|SKIPPED)|\d+ tests? collected"
               r"|^=+ .*\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s)")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b")


def pytest_summary(lines: list[str]) -> dict | None:
    """pytest's closing line ("== 20 passed, 2 failed, 1 skipped in 31.2s ==") as counts; None if absent."""
    for line in reversed(lines):
        if line.startswith("=") and re.search(r" in [\d.]+s", line):
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            for number, word in PYTEST_COUNT.findall(line):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return {**counts, "summary": line.strip("= ").strip()}
    return None


def pytest_after(ctx: Context, record: dict) -> None:
    import xml.etree.ElementTree as ET

    junit = ctx.work / "pytest_gpu" / "junit.xml"
    lines = record.get("lines", [])
    if ctx.dry_run:
        collected = [line for line in lines if "collected" in line]
        count = re.search(r"(\d+) tests? collected", collected[-1]) if collected else None
        record["result"] = {"collected": collected[-1] if collected else None,
                            "collected_count": int(count.group(1)) if count else None}
        return
    summary = pytest_summary(lines)
    if not junit.is_file():  # killed before pytest wrote its report: count the verbose lines
        outcome = {word: sum(f" {word}" in line for line in lines) for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        record["result"] = {"tests": sum(outcome.values()), "failures": outcome["FAILED"], "errors": outcome["ERROR"],
                            "skipped": outcome["SKIPPED"], "incomplete": summary is None, "pytest_summary": summary,
                            "failed_tests": [{"test": line.split(" ")[0], "message": ""} for line in lines
                                             if " FAILED" in line or " ERROR" in line]}
        return
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (problem.get("message") or "")[:400]})
    record["result"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    record["result"]["failed_tests"] = failures
    record["result"]["pytest_summary"] = summary


def kernels_argv(ctx: Context) -> list[str]:
    out = ctx.work_dir("bench_kernels")
    common = ["bench", "kernels", "--kernels", "rms_norm", "bias_gelu", "swiglu", "rope", "--out", str(out)]
    if ctx.dry_run:
        return _cli(ctx, *common, "--interpret", "--tokens", "64", "--hidden", "256", "--ffn", "1024", "--heads",
                    "4", "--head-dim", "32", "--no-compile", "--reps", "1")
    return _cli(ctx, *common, "--tokens", "8192", "--dtype", "bf16")


def flce_argv(ctx: Context) -> list[str]:
    out = ctx.work_dir("bench_flce")
    common = ["bench", "kernels", "--kernels", "flce", "--no-compile", "--out", str(out)]
    if ctx.dry_run:
        return _cli(ctx, *common, "--interpret", "--tokens", "64", "--hidden", "64", "--vocab", "2048",
                    "--vocab-chunk", "512", "--reps", "1")
    return _cli(ctx, *common, "--tokens", "8192", "--hidden", "4096", "--vocab", "250752", "--dtype", "bf16")


def bench_csv_after(png_name: str) -> Callable[[Context, dict], None]:
    def after(ctx: Context, record: dict) -> None:
        folder = ctx.work / record["name"]
        if not record.get("rows") and (folder / "kernels.csv").is_file():  # a bench that printed no rows
            with open(folder / "kernels.csv", encoding="utf-8") as f:
                record["rows"] = list(csv.DictReader(f))
        if (folder / "kernels.png").is_file():
            shutil.copyfile(folder / "kernels.png", ctx.out / png_name)
            record["files"] = [png_name]
    return after


def train_argv(ctx: Context, checkpointing: bool, memory_fraction: float = 0.9) -> list[str]:
    extra = ["--activation-checkpointing", "--warmup-steps", "1", "--steps", "3"] if checkpointing \
        else ["--warmup-steps", "2", "--steps", "4"]
    if ctx.dry_run:
        return _cli(ctx, "bench", "train", "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "256",
                    "--vocab", "512", "--seq-len", "64", "--micro-batch", "2", "--grad-accum", "1", "--steps", "1",
                    "--warmup-steps", "1", "--kernels", "triton", *extra)
    # The checkpointed run keeps the first run's layer count, so the two differ only in recomputation.
    first = (ctx.records.get("bench_train", {}).get("result") or {}).get("layers")
    layers = str(first) if checkpointing and first and memory_fraction == 0.9 else "auto"
    return _cli(ctx, "bench", "train", "--layers", layers, "--memory-fraction", str(memory_fraction),
                "--grad-accum", "8", *extra)


def moe_argv(ctx: Context) -> list[str]:
    if ctx.dry_run:
        return _cli(ctx, "bench", "moe", "--tokens", "128", "--hidden", "64", "--ffn", "256", "--experts", "4",
                    "--reps", "1", "--kernels", "triton")
    return _cli(ctx, "bench", "moe")


def ghostgru_argv(ctx: Context) -> list[str]:
    if ctx.dry_run:
        return _cli(ctx, "bench", "ghostrnn", "--batch", "4", "--seq-len", "8", "--hidden", "32", "--ratios", "2",
                    "--repeats", "1", "--impl", "triton", "--device", "cpu")
    return _cli(ctx, "bench", "ghostrnn")


def sanity_argv(ctx: Context) -> list[str]:
    return [ctx.python, "-m", "fuxi.launch.pretrain_sanity", "--out", str(ctx.work_dir("pretrain_sanity"))] + \
        (["--dry-run"] if ctx.dry_run else [])


def sanity_after(ctx: Context, record: dict) -> None:
    png = ctx.work / "pretrain_sanity" / "pretrain_sanity.png"
    if png.is_file():
        shutil.copyfile(png, ctx.out / png.name)
        record["files"] = [png.name]


OOM = r"OutOfMemoryError|CUDA out of memory"

# Caps sum to the budget (GPU_BUDGET_S). The steps never measured on a GPU (MoE, GhostGRU, the GPU tests) run
# right after the environment, before the kernel and training benchmarks, so a short run still covers them.
STEPS = [
    Step("wheels", "carried wheels installed (pip --target, no network)", 20, 5, wheels_argv, wheels_after),
    Step("env", "versions, device, imports", 25, 5, env_argv),
    Step("bench_moe", "d. fuxi bench moe: grouped GEMM vs expert loop", 45, 15, moe_argv),
    Step("bench_ghostgru", "d. fuxi bench ghostrnn: GhostGRU kernel vs cuDNN GRU", 60, 20, ghostgru_argv),
    Step("pytest_gpu", "a. pytest -m gpu", 100, 30, pytest_argv, pytest_after, keep_lines=PYTEST_LINE),
    Step("bench_kernels", "b. fuxi bench kernels: RMSNorm, bias-GELU, SwiGLU, RoPE", 90, 40, kernels_argv,
         bench_csv_after("kernels.png")),
    Step("bench_flce", "b. fuxi bench kernels: fused linear cross-entropy", 40, 20, flce_argv,
         bench_csv_after("flce.png")),
    # Out of memory (the layer fit is an estimate): once more, planning for 75% of the GPU's memory.
    Step("bench_train", "c. fuxi bench train: 8B-shaped layers, ZeRO-2, bf16", 60, 40,
         lambda ctx: train_argv(ctx, False), retry_on=OOM, retry_argv=lambda ctx: train_argv(ctx, False, 0.75)),
    Step("bench_train_ac", "c. fuxi bench train: the same with activation checkpointing", 30, 30,
         lambda ctx: train_argv(ctx, True), retry_on=OOM, retry_argv=lambda ctx: train_argv(ctx, True, 0.75)),
    Step("pretrain_sanity", "e. fuxi pretrain, 20 steps: GPU bf16 vs CPU fp32", 40, 40, sanity_argv,
         sanity_after),
]


# ---- running one step ------------------------------------------------------------------------------------

def run_step(step: Step, ctx: Context, timeout: float, log, argv: list[str] | None = None) -> dict:
    record = {"name": step.name, "title": step.title, "timeout_s": round(timeout), "status": "skipped",
              "seconds": 0.0, "result": None}
    argv = argv or step.argv(ctx)
    if argv is None:
        record["reason"] = "nothing to do: no .whl/ folder (run `make gpu-wheels` where there is a network)"
        record["skipped_for"] = "nothing to do"
        return record
    record["command"] = " ".join(argv)
    log.write(f"\n===== {step.name}: {step.title}\n$ {record['command']}\n")
    log.flush()
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=ctx.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    tail: deque[str] = deque(maxlen=60)
    kept: list[str] = []
    keep = re.compile(step.keep_lines) if step.keep_lines else None
    retry = re.compile(step.retry_on) if step.retry_on else None
    last_json: list[dict] = []
    rows: list[dict] = []    # {"row": ...} lines: each measurement as the bench finished it
    checks: list[dict] = []  # {"check": ...} lines: correctness checks (passed, error figures)
    written = [0]
    retry_matched = [False]

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if keep is not None and keep.search(line) and len(kept) < 1000:
                kept.append(line.strip())
            if retry is not None and retry.search(line):
                retry_matched[0] = True
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                    if isinstance(value, dict):
                        collect_json(value, rows, checks, last_json)
                except json.JSONDecodeError:
                    pass
            if written[0] < LOG_BYTES_PER_STEP:
                log.write(line)
                written[0] += len(line)
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        record["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        record["status"] = "timeout"
        _kill_group(proc)
    reader.join(timeout=10)
    record["seconds"] = round(time.monotonic() - started, 1)
    record["returncode"] = proc.returncode
    if written[0] >= LOG_BYTES_PER_STEP:
        log.write(f"[... log truncated at {LOG_BYTES_PER_STEP} bytes; last lines:]\n" + "\n".join(tail) + "\n")
    log.write(f"===== {step.name}: {record['status']} in {record['seconds']} s\n")
    log.flush()
    record["result"] = last_json[0] if last_json else None
    if rows:
        record["rows"] = rows
    if checks:
        record["checks"] = checks
    record["tail"] = list(tail)[-25:]
    if keep is not None:
        record["lines"] = kept
    record["retry_matched"] = retry_matched[0]
    if step.after is not None:
        try:
            step.after(ctx, record)
        except Exception as err:  # a parsing problem must not lose the step's status
            record["after_error"] = f"{type(err).__name__}: {err}"
    if record["status"] == "ok":
        record.pop("tail")
    return record


def collect_json(value: dict, rows: list[dict], checks: list[dict], last: list[dict]) -> None:
    """Sort one JSON line of a step's output: {"row": {...}} and {"check": {...}} (kernels.bench.print_row)
    are appended as they come, so a step killed at its time box keeps what it finished; any other object is the
    step's result, the last one printed winning."""
    if len(value) == 1 and isinstance(value.get("row"), dict):
        rows.append(value["row"])
    elif len(value) == 1 and isinstance(value.get("check"), dict):
        checks.append(value["check"])
    else:
        last[:] = [value]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def seconds_since_start() -> float:
    """Seconds since the check began: since launch/gpu_check.sh started (its FUXI_GPU_CHECK_T0), else since this
    process started (Linux /proc), else 0. The budget counts the interpreter start-up and imports too."""
    t0 = os.environ.get(T0_ENV)
    if t0:
        try:
            return max(0.0, time.time() - float(t0))
        except ValueError:
            raise SystemExit(f"gpu_check: {T0_ENV}={t0!r} is not a number of seconds") from None
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def time_box(steps: list[Step], index: int, left: float, slack: float = 1.0) -> float:
    """The step's cap, shortened so the steps after it keep their minimum; 0 when it cannot get its own.
    `slack` scales caps and minimums (the dry run's)."""
    reserve = slack * sum(s.min_s for s in steps[index + 1:])
    box = min(slack * steps[index].cap_s, left - reserve)
    return box if box >= slack * steps[index].min_s else 0.0


# ---- environment report (run as its own step, with the carried packages on the path) ---------------------

def env_report(dry_run: bool) -> dict:
    import importlib
    import importlib.metadata as metadata
    import platform

    report: dict = {"python": platform.python_version(), "executable": sys.executable,
                    "platform": platform.platform(), "cpus": os.cpu_count(), "modules": {}, "missing": []}
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
            report["modules"][name] = getattr(module, "__version__", "present")
        except Exception as err:  # ImportError, or a package that fails while importing
            report["modules"][name] = None
            if name in REQUIRED_MODULES:
                report["missing"].append(f"{name} ({type(err).__name__}: {str(err)[:160]})")
    report["unmet_requirements"] = _unmet_requirements(metadata, dry_run)
    try:
        import torch

        report["torch_cuda"] = torch.version.cuda
        report["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            report.update(device=torch.cuda.get_device_name(0), total_mem_gb=round(props.total_memory / 1e9, 2),
                          sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                          cudnn=torch.backends.cudnn.version())
    except Exception as err:
        report["torch_error"] = f"{type(err).__name__}: {err}"
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        report["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    report["ok"] = not report["missing"] and (dry_run or bool(report.get("cuda_available")))
    return report


def _unmet_requirements(metadata, dry_run: bool) -> list[str]:
    """Requirements of the carried distributions that nothing installed satisfies (by name and version). A dry
    run has the carried wheels installed for the GPU machine's Python, not its own: it checks those present."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging is not installed: requirements not checked"]
    unmet = []
    for path in sorted((REPO / ".whl").glob("*.whl")):
        name = path.name.split("-")[0]
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            if not dry_run:
                unmet.append(f"{name}: carried but not installed")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{name} needs {req} (not installed)")
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                unmet.append(f"{name} needs {req}, found {version}")
    return unmet


# ---- the whole check -------------------------------------------------------------------------------------

def carry_size_bytes() -> dict:
    """Bytes a device call would carry: the working tree (tracked + untracked, not ignored) and .whl/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO / os.fsdecode(p)).stat().st_size for p in listed if p and (REPO / os.fsdecode(p)).is_file())
    wheels = sum(p.stat().st_size for p in (REPO / ".whl").glob("*")) if (REPO / ".whl").is_dir() else 0
    return {"tree_bytes": tree, "wheels_bytes": wheels, "total_bytes": tree + wheels, "limit_bytes": CARRY_LIMIT_BYTES}


def headline(records: dict) -> dict:
    """The few numbers a reader looks for first."""
    def result(name: str) -> dict:
        return records.get(name, {}).get("result") or {}

    out = {}
    for key in ("measured_bw_gbps", "rms_norm_triton_pct_bw", "rms_norm_speedup_vs_compile",
                "bias_gelu_triton_pct_bw", "bias_gelu_speedup_vs_compile", "swiglu_triton_pct_bw",
                "swiglu_speedup_vs_compile", "rope_triton_pct_bw", "rope_speedup_vs_compile"):
        if key in result("bench_kernels"):
            out[key] = result("bench_kernels")[key]
    for key in ("flce_peak_mem_ratio", "flce_time_ratio", "flce_liger_time_ratio"):
        if key in result("bench_flce"):
            out[key] = result("bench_flce")[key]
    for name in ("bench_train", "bench_train_ac"):
        for key in ("layers", "tokens_per_s_per_device", "tflops_per_device", "mfu", "mfu_vs_measured_matmul",
                    "measured_matmul_tflops", "peak_mem_gb"):
            if result(name).get(key) is not None:
                out[f"{name.replace('bench_', '')}_{key}"] = result(name)[key]
    if "grouped_mm_fwd_bwd_speedup_vs_loop" in result("bench_moe"):
        out["moe_grouped_mm_speedup_vs_loop"] = result("bench_moe")["grouped_mm_fwd_bwd_speedup_vs_loop"]
    for key, value in result("bench_ghostgru").items():
        if key.endswith("_fwd_bwd_speedup_vs_gru"):
            out[f"ghostgru_{key}"] = value
    if "passed" in result("pretrain_sanity"):
        out["pretrain_sanity_passed"] = result("pretrain_sanity")["passed"]
    tests = result("pytest_gpu")
    if isinstance(tests.get("tests"), int):
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        out["pytest_gpu"] = f"{passed}/{tests['tests']} passed"
    return out


def correctness(records: dict) -> list[dict]:
    """Every correctness figure of the run: the benches' checks (MoE grouped vs loop, the fused loss vs eager,
    in bf16 against fp32) and the GPU tests' counts; "passed" is None where nothing was decided (a dry run's
    collect-only pytest)."""
    found = [{"step": name, **check} for name, record in records.items() for check in record.get("checks") or []]
    tests = (records.get("pytest_gpu") or {}).get("result") or {}
    if isinstance(tests.get("tests"), int):
        bad = tests["failures"] + tests["errors"]
        incomplete = bool(tests.get("incomplete"))
        found.append({"step": "pytest_gpu", "check": "pytest -m gpu", "passed": bad == 0 and not incomplete,
                      "tests": tests["tests"], "failed": bad, "skipped": tests["skipped"],
                      "passed_tests": tests["tests"] - bad - tests["skipped"], "incomplete": incomplete})
    elif tests.get("collected_count") is not None:
        found.append({"step": "pytest_gpu", "check": "pytest -m gpu (dry run: collected only)", "passed": None,
                      "tests": tests["collected_count"]})
    return found


def run_check(args: argparse.Namespace, already_s: float = 0.0) -> dict:
    from fuxi.launch.gpu_check_report import evaluate_goals, markdown_report

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or (out / "work" if args.dry_run else Path(os.environ.get("TMPDIR", "/tmp"))
                              / "fuxi_gpu_check")).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
               TRITON_CACHE_DIR=str(work / "triton_cache"))
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    ctx = Context(args.dry_run, out, work, sys.executable, env, {})
    selected = [s for s in STEPS if not args.only or s.name in args.only or s.name in ("wheels", "env")]
    unknown = sorted(set(args.only or []) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {unknown}; steps: {[s.name for s in STEPS]}")
    budget = args.budget or DEFAULT_BUDGET_S[args.dry_run]
    # `already_s`: the seconds the check ran before this call (main: since the shell script or process began).
    started, started_at = time.monotonic() - already_s, datetime.datetime.now(datetime.timezone.utc)
    git = git_state()
    report = {"schema": SCHEMA, "dry_run": args.dry_run, "started": started_at.isoformat(timespec="seconds"),
              "budget_s": budget, "command": " ".join(["bash", "launch/gpu_check.sh", *args.argv_echo]),
              "git_commit": commit_label(git), "git": git, "steps": ctx.records}
    log_path = out / "gpu_check.log"
    print(f"gpu_check: {'dry run (CPU, tiny shapes, Triton interpreter)' if args.dry_run else 'GPU'}; "
          f"budget {budget} s; steps {[s.name for s in selected]}; out {out}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        for i, step in enumerate(selected):
            left = budget - (time.monotonic() - started)
            box = time_box(selected, i, left, DRY_RUN_SLACK if args.dry_run else 1.0)
            if box <= 0:
                record = {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0.0,
                          "result": None, "skipped_for": "budget",
                          "reason": f"{left:.0f} s of the budget left; the step needs {step.min_s} s and the "
                                    "later steps their minimum"}
            else:
                record = run_step(step, ctx, box, log)
                left = budget - (time.monotonic() - started)
                box = time_box(selected, i, left, DRY_RUN_SLACK if args.dry_run else 1.0)
                if record["status"] == "failed" and record.pop("retry_matched") and box > 0:
                    first = {k: record[k] for k in ("status", "seconds", "returncode", "command", "tail")}
                    print(f"  {step.name:<16} {record['status']:<8} {record['seconds']:>6.1f} s  retrying", flush=True)
                    record = run_step(step, ctx, box, log, argv=step.retry_argv(ctx))
                    record["first_attempt"] = first
                record.pop("retry_matched", None)
            ctx.records[step.name] = record
            print(f"  {step.name:<16} {record['status']:<8} {record['seconds']:>6.1f} s  {step.title}", flush=True)
            report["seconds"] = round(time.monotonic() - started, 1)
            if step.name == "env" and record.get("result"):
                report["machine"] = record["result"]
            write_json(out / "gpu_check.json", report)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["headline"] = headline(ctx.records)
    report["goals"] = evaluate_goals(ctx.records, args.dry_run)
    report["correctness"] = correctness(ctx.records)
    report["status"] = "ok" if all(r["status"] == "ok" or r.get("skipped_for") == "nothing to do"
                                   for r in ctx.records.values()) \
        and all(c["passed"] is not False for c in report["correctness"]) else "failed"
    report["files"] = sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".log", ".md",
                                                                                            ".png"))
    write_json(out / "gpu_check.json", report)
    write_text(out / "gpu_check.md", markdown_report(report))
    if "gpu_check.md" not in report["files"]:
        report["files"] = sorted(report["files"] + ["gpu_check.md"])
        write_json(out / "gpu_check.json", report)
    return report


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict:
    """The commit this checkout is at: from git where there is a .git, else from the stamp `make gpu-stamp`
    writes into the carried .whl/ (the device machine gets the working tree without .git), else "unknown"."""
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(dirty), "source": "git"}
    if COMMIT_STAMP.is_file():
        try:
            stamp = json.loads(COMMIT_STAMP.read_text(encoding="utf-8"))
            return {"commit": str(stamp["commit"]), "dirty": bool(stamp.get("dirty")),
                    "stamped": stamp.get("stamped"), "source": str(COMMIT_STAMP.relative_to(REPO))}
        except (ValueError, KeyError, TypeError) as err:
            return {"commit": "unknown", "source": f"{COMMIT_STAMP.relative_to(REPO)} unreadable: {err}"}
    return {"commit": "unknown", "source": f"no .git here and no {COMMIT_STAMP.relative_to(REPO)} "
                                           "(run `make gpu-stamp` before the device call)"}


def stamp_commit() -> dict:
    """Write git_state() (from git) to COMMIT_STAMP, the file that carries it to the device machine."""
    state = git_state()
    if state["source"] != "git":
        raise SystemExit(f"gpu_check: --stamp-commit needs git: {state['source']}")
    state["stamped"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    COMMIT_STAMP.parent.mkdir(exist_ok=True)
    write_json(COMMIT_STAMP, {k: state[k] for k in ("commit", "dirty", "stamped")})
    return state


def commit_label(state: dict) -> str:
    """"<12 hex>[+dirty]" as gpu_check.md prints it, or "unknown"."""
    if state["commit"] == "unknown":
        return "unknown"
    return state["commit"][:12] + (" + uncommitted changes" if state.get("dirty") else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton under the interpreter")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--work", default=None, help="scratch folder (default: $TMPDIR/fuxi_gpu_check; dry run: "
                                                     "OUT/work)")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"seconds for all steps, counted from the start of launch/gpu_check.sh (default "
                             f"{GPU_BUDGET_S}; dry run {DRY_RUN_SLACK * GPU_BUDGET_S})")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP",
                        help=f"run only these steps (wheels and env always run): {[s.name for s in STEPS]}")
    parser.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stamp-commit", action="store_true",
                        help=f"write this checkout's git commit to {COMMIT_STAMP.relative_to(REPO)} (make gpu-stamp)")
    parser.add_argument("--check-carry", action="store_true",
                        help="report the bytes a device call carries (tree + .whl/) against its 64 MiB limit")
    args = parser.parse_args(argv)
    args.argv_echo = argv
    if args.env_report:
        report = env_report(args.dry_run)
        for key in ("python", "device", "total_mem_gb", "torch_cuda", "nvidia_smi"):
            if key in report:
                print(f"{key:<14}{report[key]}")
        for problem in report["missing"] + report["unmet_requirements"]:
            print(f"MISSING       {problem}")
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    if args.stamp_commit:
        state = stamp_commit()
        print(f"{COMMIT_STAMP.relative_to(REPO)}: {commit_label(state)}")
        return 0
    if args.check_carry:
        size = carry_size_bytes()
        print(f"working tree {size['tree_bytes'] / 2**20:.1f} MiB + .whl {size['wheels_bytes'] / 2**20:.1f} MiB = "
              f"{size['total_bytes'] / 2**20:.1f} MiB of {CARRY_LIMIT_BYTES / 2**20:.0f} MiB")
        print(json.dumps(size))
        return 0 if size["total_bytes"] < CARRY_LIMIT_BYTES else 1
    report = run_check(args, seconds_since_start())
    summary = {"gpu_check": report["status"], "dry_run": report["dry_run"],
               "device": (report.get("machine") or {}).get("device", "cpu" if args.dry_run else None),
               "seconds": report["seconds"], "steps": {k: v["status"] for k, v in report["steps"].items()},
               "headline": report["headline"],
               "goals_met": {k: g.get("met") for k, g in report["goals"].items()},
               "correctness": {c["check"]: c["passed"] for c in report["correctness"]},
               "commit": report["git_commit"],
               "out": str(Path(args.out).resolve())}
    print(json.dumps(summary))
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
