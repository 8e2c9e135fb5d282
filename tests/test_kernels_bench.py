"""`fuxi bench kernels` as a script: a tiny CPU run writes its CSV, markdown and plot and ends with the JSON
headline, whose fused-loss memory comes from two real subprocess measurements (not a timed test)."""
import argparse
import csv
import json

import pytest
import torch

from fuxi.kernels import bench


@pytest.mark.slow
def test_bench_cpu_run_writes_reports(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--tokens", "64", "--no-compile", "--reps", "1", "--vocab", "50000",
                              "--vocab-chunk", "2048", "--flce-cpu-tokens", "512", "--flce-cpu-hidden", "64",
                              "--out", str(tmp_path)])
    summary = bench.run(args)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == summary
    rows = list(csv.DictReader(open(tmp_path / "kernels.csv")))
    assert {r["kernel"] for r in rows} == {"rms_norm", "bias_gelu", "swiglu", "rope", "flce"}
    assert all(float(r["full_ms"]) > 0 for r in rows)
    assert (tmp_path / "kernels.png").stat().st_size > 0
    table = (tmp_path / "kernels.md").read_text()
    assert "| flce | 512 | chunked_torch |" in table
    # The CSV rows read back (as the GPU check's report does) give the same table, NaN cells included.
    assert bench.markdown_table([bench.Result.from_csv_row(r) for r in rows]) + "\n" == table
    # eager holds 512 x 50,000 fp32 logits several times over; the chunked loss one 512 x 2,048 block.
    assert summary["flce_peak_mem_mb_eager"] > 150
    assert summary["flce_peak_mem_ratio"] < 0.25
    assert summary["flce_mean_loss_abs_diff"] < 1e-4


def test_every_case_builder_takes_the_same_arguments():
    """The run loop builds every kernel's case through CASE_BUILDERS with one signature; each case's inputs
    have the widths it was given (the fused loss: hidden and vocabulary)."""
    widths = bench.Widths(hidden=16, ffn=48, heads=2, head_dim=8, vocab=40)
    cpu = torch.device("cpu")
    for kernel, build in bench.CASE_BUILDERS.items():
        case = build(8, torch.float32, cpu, False, False, widths)
        assert case.kernel == kernel and set(case.providers) >= {"eager"}
        torch.autograd.backward(*case.grads(case.providers["eager"]()))
        assert all(leaf.grad is not None for leaf in case.leaves)
    flce = bench.CASE_BUILDERS["flce"](8, torch.float32, cpu, False, False, widths)
    assert [tuple(t.shape) for t in flce.leaves] == [(8, 16), (40, 16)] and flce.flops == 6.0 * 8 * 16 * 40
    # FLOPs per provider: eager's 3 matmuls (6NhV), the chunked loss's 4 (8NhV; its backward recomputes logits)
    assert flce.provider_flops == {"eager": 6.0 * 8 * 16 * 40, "chunked_torch": 8.0 * 8 * 16 * 40}


def test_table_cells_round_trip_and_large_numbers_get_separators():
    row = bench.Result("rope", "triton", 4096, fwd_ms=0.5, full_ms=1.25, peak_mem_mb=12345.6, gbps=2900.0)
    back = bench.Result.from_csv_row({k: str(v) for k, v in vars(row).items()} | {"bwd_ms": ""})
    line = bench.markdown_table([back]).splitlines()[-1]
    assert line == "| rope | 4096 | triton | 0.5 | - | 1.25 | 12,346 | 2.9e+03 | - | - |  |"


class CompilationError(Exception):
    """Stands in for triton.compiler.errors.CompilationError: an Exception, not a RuntimeError."""


def test_a_provider_raising_any_exception_is_an_error_row_and_the_others_still_run():
    x = torch.randn(8, 16, requires_grad=True)

    def broken():
        raise CompilationError("at 13:13: out of resources")

    case = bench.Case("toy", 8, {"torch": lambda: x * 2, "triton": broken, "torch_again": lambda: x * 3}, [x],
                      lambda out: ([out], [torch.ones_like(out)]))
    rows = bench.run_case(case, torch.device("cpu"), reps=1, bandwidth_gbps=1.0)
    assert [r.provider for r in rows] == ["torch", "triton", "torch_again"]
    failed = rows[1]
    assert failed.note == "failed: CompilationError: at 13:13: out of resources"
    assert failed.full_ms != failed.full_ms  # NaN: nothing measured
    assert all(r.full_ms > 0 and r.note == "" for r in (rows[0], rows[2]))
