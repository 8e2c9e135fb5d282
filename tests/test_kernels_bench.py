"""`fuxi bench kernels` as a script: a tiny CPU run writes its CSV, markdown and plot and ends with the JSON
headline, whose fused-loss memory comes from two real subprocess measurements (not a timed test)."""
import argparse
import csv
import json

import pytest

from kernels import bench


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
    assert {r["kernel"] for r in rows} == {"rms_norm", "bias_gelu", "rope", "flce"}
    assert all(float(r["full_ms"]) > 0 for r in rows)
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert "| flce | 512 | chunked_torch |" in (tmp_path / "kernels.md").read_text()
    # eager holds 512 x 50,000 fp32 logits several times over; the chunked loss one 512 x 2,048 block.
    assert summary["flce_peak_mem_mb_eager"] > 150
    assert summary["flce_peak_mem_ratio"] < 0.25
    assert summary["flce_mean_loss_abs_diff"] < 1e-4
