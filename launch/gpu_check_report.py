"""gpu_check.json -> the issue's goals and the markdown rows for docs/benchmarks.md.

    python -m fuxi.launch.gpu_check_report gpu_check_out/gpu_check.json     # prints the markdown section

launch/gpu_check.py also writes it as gpu_check.md beside the JSON, so recording a GPU session's figures is a
copy and paste, with the date, device and versions filled in from the run itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fuxi.kernels.bench import Result, markdown_table

# (goal, how it is read from a step's result, comparison, threshold) -- the figures issue 14 asks to beat.
GOALS = {
    "mfu_8b_layers": ("bench_train", "mfu", ">=", 0.45),
    "rms_norm_pct_bw": ("bench_kernels", "rms_norm_triton_pct_bw", ">=", 80.0),
    "bias_gelu_pct_bw": ("bench_kernels", "bias_gelu_triton_pct_bw", ">=", 80.0),
    "swiglu_pct_bw": ("bench_kernels", "swiglu_triton_pct_bw", ">=", 80.0),  # issue 23's kernel, the same bar
    "rope_pct_bw": ("bench_kernels", "rope_triton_pct_bw", ">=", 80.0),
    "rms_norm_faster_than_compile": ("bench_kernels", "rms_norm_speedup_vs_compile", ">", 1.0),
    "bias_gelu_faster_than_compile": ("bench_kernels", "bias_gelu_speedup_vs_compile", ">", 1.0),
    "swiglu_faster_than_compile": ("bench_kernels", "swiglu_speedup_vs_compile", ">", 1.0),
    "rope_faster_than_compile": ("bench_kernels", "rope_speedup_vs_compile", ">", 1.0),
    "flce_peak_mem_vs_eager": ("bench_flce", "flce_peak_mem_ratio", "<=", 0.125),
    "flce_time_vs_eager": ("bench_flce", "flce_time_ratio", "<=", 1.0),
    "pretrain_gpu_matches_cpu": ("pretrain_sanity", "passed", "==", True),
}


def evaluate_goals(steps: dict, dry_run: bool) -> dict:
    """Each goal with its measured value and whether it is met (None when not measured; always None in a dry
    run, whose tiny CPU shapes say nothing about a GPU)."""
    goals = {}
    for name, (step, key, op, threshold) in GOALS.items():
        value = ((steps.get(step) or {}).get("result") or {}).get(key)
        met = None
        if value is not None and not dry_run and not (isinstance(value, float) and math.isnan(value)):
            met = {">=": value >= threshold, ">": value > threshold, "<=": value <= threshold,
                   "==": value == threshold}[op]
        goals[name] = {"step": step, "value": value, "goal": f"{op} {threshold}", "met": met}
    return goals


def _num(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "-"
    return f"{number:,.{digits}g}" if abs(number) < 1e4 else f"{number:,.0f}"


def _result(report: dict, step: str) -> dict:
    return (report["steps"].get(step) or {}).get("result") or {}


def _table(title: str, columns: str, rows: list[list]) -> list[str]:
    """A markdown table under a heading. `columns`: names separated by '|', a trailing ':' right-aligns one."""
    names = [c.strip() for c in columns.split("|")]
    head = "| " + " | ".join(n.rstrip(":") for n in names) + " |"
    rule = "|" + "|".join("---:" if n.endswith(":") else "---" for n in names) + "|"
    return ["", title, "", head, rule] + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_report(report: dict) -> str:
    machine = report.get("machine") or {}
    modules = machine.get("modules") or {}
    date = (report.get("started") or "")[:10]
    device = machine.get("device", "CPU (dry run)" if report["dry_run"] else "unknown device")
    lines = [f"### GPU check, {date}: {device}" + (" (DRY RUN: CPU, tiny shapes, not GPU figures)"
                                                    if report["dry_run"] else ""),
             "",
             f"Device {device}, {_num(machine.get('total_mem_gb'))} GB, {machine.get('sm_count', '-')} SMs; "
             f"driver/clocks `{machine.get('nvidia_smi', '-')}`; python {machine.get('python', '-')}, "
             f"torch {modules.get('torch', '-')} (CUDA {machine.get('torch_cuda', '-')}), "
             f"triton {modules.get('triton', '-')}, transformers {modules.get('transformers', '-')}, "
             f"deepspeed {modules.get('deepspeed', '-')}, liger-kernel {modules.get('liger_kernel') or 'not carried'}; "
             f"commit {report.get('git_commit', '-')}; `{report.get('command', '')}` took "
             f"{_num(report.get('seconds'))} s."]
    lines += _table("#### Steps", "step | status | seconds:",
                    [[step.get("title", name), step["status"], _num(step.get("seconds"))]
                     for name, step in report["steps"].items()])

    pytest_result = _result(report, "pytest_gpu")
    if "tests" in pytest_result:
        lines += ["", f"pytest -m gpu: {pytest_result['tests']} tests, {pytest_result['failures']} failures, "
                      f"{pytest_result['errors']} errors, {pytest_result['skipped']} skipped"
                      + (" (killed at its time box: counted from the verbose lines)." if pytest_result.get("incomplete")
                         else ".")]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in pytest_result.get("failed_tests", [])]

    for step, title in (("bench_kernels", "Kernels"), ("bench_flce", "Fused linear cross-entropy")):
        rows = (report["steps"].get(step) or {}).get("rows") or []
        if rows:
            result = _result(report, step)
            lines += ["", f"#### {title} ({result.get('dtype', '-')}; measured copy bandwidth "
                          f"{_num(result.get('measured_bw_gbps'))} GB/s)", "",
                      markdown_table([Result.from_csv_row(r) for r in rows])]

    train = [r for r in (_result(report, "bench_train"), _result(report, "bench_train_ac")) if r]
    if train:
        def shape(r: dict) -> str:
            return (f"{r.get('layers', '?')} layers x h {r.get('hidden', '?')}, {r.get('heads', '?')} heads, FFN "
                    f"{r.get('ffn', '?')}, seq {r.get('seq_len', '?')}, V {r.get('vocab', '?')}, micro "
                    f"{r.get('micro_batch', '?')} x accum {r.get('grad_accum', '?')}, ZeRO-{r.get('zero_stage', '?')}, "
                    f"{r.get('precision', '?')}")

        lines += _table("#### Training step (`fuxi bench train`, 1 GPU)",
                        "date | device | shape | AC | step s: | tokens/s: | TFLOP/s: | MFU (spec peak): | "
                        "MFU (measured matmul): | peak GB:",
                        [[date, r.get("device", "-"), shape(r), "yes" if r.get("activation_checkpointing") else "no",
                          _num(r.get("step_time_s")), _num(r.get("tokens_per_s_per_device")),
                          _num(r.get("tflops_per_device")), _percent(r.get("mfu")),
                          _percent(r.get("mfu_vs_measured_matmul")), _num(r.get("peak_mem_gb"))] for r in train])
        if train[0].get("measured_matmul_tflops"):
            lines.append(f"\nMeasured bf16 matmul (8192^3, random data): {_num(train[0]['measured_matmul_tflops'])} "
                         f"TFLOP/s; spec peak {_num(train[0].get('peak_tflops'))} TFLOP/s.")

    checks = report.get("correctness") or []
    if checks:
        def figure(c: dict) -> str:
            if "max_abs_err" in c:
                return (f"max abs error {_num(c['max_abs_err'])} <= {_num(c['bound'])} = {c['factor']:g} x "
                        f"PyTorch's {_num(c['torch_max_abs_err'])}" + (f" (worst: {c['worst']})" if c.get("worst")
                                                                       else ""))
            if "failed" in c:
                return (f"{c['passed_tests']} passed, {c['failed']} failed, {c['skipped']} skipped of {c['tests']}"
                        + (" (killed at its time box)" if c.get("incomplete") else ""))
            if "tests" in c:
                return f"{c['tests']} collected"
            return c.get("error", "-")

        lines += _table("#### Correctness (bf16 against an fp32 reference: at most 2x PyTorch's own bf16 error for "
                        "outputs, 3x for gradients)", "step | check | passed | figure | path",
                        [[c["step"], c["check"], {True: "yes", False: "**no**", None: "-"}[c["passed"]], figure(c),
                          c.get("path", "")] for c in checks])

    moe = _result(report, "bench_moe")
    if not moe.get("rows") and (report["steps"].get("bench_moe") or {}).get("rows"):  # killed: the streamed rows
        moe = {"tokens": "?", "hidden": "?", "ffn": "?", "experts": "?", "top_k": "?", "dtype": "?",
               "rows": [{"fwd_bwd_speedup_vs_loop": None, **r} for r in report["steps"]["bench_moe"]["rows"]]}
    if moe.get("rows"):
        lines += _table(f"#### MoE layer ({moe['tokens']} tokens, h {moe['hidden']}, FFN {moe['ffn']}, "
                        f"{moe['experts']} experts, top-{moe['top_k']}, {moe['dtype']})",
                        "expert compute | fwd ms: | fwd+bwd ms: | expert TFLOP/s: | x loop:",
                        [[r["variant"], _num(r["fwd_ms"]), _num(r["fwd_bwd_ms"]), _num(r["expert_tflops"]),
                          _num(r["fwd_bwd_speedup_vs_loop"])] for r in moe["rows"]])

    ghost = _result(report, "bench_ghostgru")
    if not ghost.get("rows") and (report["steps"].get("bench_ghostgru") or {}).get("rows"):  # killed
        ghost = {"batch": "?", "seq_len": "?", "hidden": "?", "dtype": "?", "impl": "?",
                 "rows": [{"fwd_speedup_vs_gru": None, "fwd_bwd_speedup_vs_gru": None, **r}
                          for r in report["steps"]["bench_ghostgru"]["rows"]]}
    if ghost.get("rows"):
        lines += _table(f"#### GhostGRU vs nn.GRU (batch {ghost['batch']}, {ghost['seq_len']} steps, H "
                        f"{ghost['hidden']}, {ghost['dtype']}, {ghost['impl']})",
                        "layer | params: | fwd ms: | fwd+bwd ms: | fwd x: | fwd+bwd x:",
                        [[r["name"], f"{r['params']:,}", _num(r["fwd_ms"]), _num(r["fwd_bwd_ms"]),
                          _num(r["fwd_speedup_vs_gru"]), _num(r["fwd_bwd_speedup_vs_gru"])] for r in ghost["rows"]])

    sanity = _result(report, "pretrain_sanity")
    if "passed" in sanity:
        lines += ["", f"#### `fuxi pretrain` sanity: {sanity.get('device_run')} ({sanity.get('precision')}) vs CPU "
                      f"fp32, {sanity.get('steps')} steps: {'passed' if sanity['passed'] else 'FAILED'}"]
        if "max_rel_diff_first_steps" in sanity:
            lines += ["", f"Max relative loss difference over the first steps "
                          f"{_num(sanity['max_rel_diff_first_steps'])} (tolerance {sanity['tolerance_first_steps']}), "
                          f"at the last step {_num(sanity['rel_diff_last_step'])} (tolerance "
                          f"{sanity['tolerance_last_step']}); both losses fell: {sanity['both_losses_fell']}."]

    goals = report.get("goals") or {}
    if goals:
        unmeasured = "n/a (dry run)" if report["dry_run"] else "not measured"
        lines += _table("#### Goals", "goal | value: | target | met",
                        [[name, _num(g["value"]), g["goal"], {True: "yes", False: "**no**", None: unmeasured}[g["met"]]]
                         for name, g in goals.items()])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="gpu_check.json written by launch/gpu_check.sh")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.json).read_text(encoding="utf-8"))
    sys.stdout.write(markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
