"""GhostRNN through the tools: `fuxi info` counts, the benchmark's output contract, the experiment's pieces."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fuxi.experiments.ghostrnn import (ByteStream, cost_rows, keyword_data, redundancy_report, sample_batch,
                                        validation_windows, build_byte_lm)
from fuxi.launch.cli import main


def layer_formula(d: int, h: int, ratio: int, feed: bool) -> int:
    m = math.ceil(h / ratio)
    k = h if feed else m  # docs/methods.md §4.3, variant A (full gates) or B
    return 3 * m * (d + k) + 6 * m + m * (h - m) + (h - m)


@pytest.mark.parametrize("name, ratio, feed", [("gru", 1, True), ("a-s2", 2, True), ("a-s3", 3, True),
                                               ("b-s2", 2, False), ("b-s3", 3, False)])
def test_fuxi_info_prints_each_variant_count(capsys, name, ratio, feed):
    assert main(["info", "--config", f"configs/model/ghostrnn-{name}.yaml"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    expected = 2 * 4096 * 512 + 2 * layer_formula(512, 512, ratio, feed)
    assert report["parameters"] == expected and f"{expected:,}" in out
    assert report["model_type"] == "ghostrnn_lm"


def test_fuxi_info_names_a_bad_ghostrnn_field(capsys):
    assert main(["info", "--config", "configs/model/ghostrnn-b-s2.yaml", "--set", "ghostrnn.gate_input=full"]) == 2
    err = capsys.readouterr().err
    assert "ghostrnn.gate_input" in err and "ghostrnn-b-s2.yaml" in err


def test_bench_prints_table_and_last_line_json(capsys):
    from fuxi.model import ghost_gru_bench

    parser = argparse.ArgumentParser()
    ghost_gru_bench.add_arguments(parser)
    args = parser.parse_args(["--batch", "2", "--seq-len", "3", "--hidden", "16", "--ratios", "2",
                              "--repeats", "1", "--device", "cpu"])
    result = ghost_gru_bench.run(args)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["hidden"] == 16 and [r["name"] for r in last["rows"]][0] == "nn.GRU"
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["GhostGRU A s=2 (torch)"]["params"] == layer_formula(16, 16, 2, True)
    assert rows["GhostGRU B s=2 (torch)"]["state_floats"] == 8
    for r in result["rows"]:
        assert r["fwd_bwd_speedup_vs_gru"] == pytest.approx(result["rows"][0]["fwd_bwd_ms"] / r["fwd_bwd_ms"])


def test_experiment_cost_rows_match_formulas():
    rows = {r["variant"]: r for r in cost_rows(64)}
    for name, ratio, feed in [("GRU", 1, True), ("A s=2", 2, True), ("B s=3", 3, False)]:
        assert rows[name]["params"] == layer_formula(64, 64, ratio, feed)
        assert rows[name]["params_vs_gru"] == pytest.approx(rows[name]["params"] / layer_formula(64, 64, 1, True))
    assert rows["B s=2"]["state_bytes_fp32"] == 4 * 32 and rows["A s=2"]["state_bytes_fp32"] == 4 * 64


def test_experiment_batches_windows_and_redundancy_pieces():
    text = torch.arange(400, dtype=torch.int64).remainder(256).to(torch.uint8)
    streams = {"xx": ByteStream(text, (torch.arange(400) // 100).int())}
    ids, labels, doc = sample_batch(streams, ["xx"], torch.tensor([1.0]), 3, 16, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == doc.shape == (3, 16)
    assert torch.equal(labels[:, :-1], ids[:, 1:])  # next-byte targets
    windows = validation_windows(streams, 2, 16)
    assert windows["xx"][0][0, 0].item() == 0 and windows["xx"][0].shape == (2, 16)
    gru = build_byte_lm("GRU", 8, 1, 0)
    report = redundancy_report(gru, gru, windows)
    assert set(report) == {"initial_layer0", "trained_layer0"}
    assert report["initial_layer0"]["positions"] == 32
    x, y = keyword_data(5, torch.Generator().manual_seed(0), torch.zeros(4, 3, 2), frames=7)
    assert x.shape == (5, 7, 2) and int(y.max()) <= 3
