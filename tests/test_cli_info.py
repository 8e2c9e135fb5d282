"""`fuxi info` and the planning arithmetic behind it (ZeRO paper's 16 bytes/param, 6N + 12Lhs, MFU)."""
import json

import pytest

from fuxi.launch.cli import main, parse_size
from fuxi.pretrain.estimates import mfu, peak_tflops_for, zero_model_state_bytes

PSI = 8_094_724_096


def test_fuxi_info_prints_count_flops_memory_and_logits(capsys):
    assert main(["info", "--config", "configs/model/fuxitranyu-8b.yaml", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "8,094,724,096" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["parameters"] == PSI
    assert report["flops_per_token"] == 6 * (PSI - 250_680 * 4096) + 12 * 30 * 4096 * 4096
    gb = report["model_state_gb_per_rank"]
    assert gb["zero0"] == pytest.approx(16 * PSI / 1e9)
    assert gb["zero1"] == pytest.approx((4 * PSI + 12 * PSI / 8) / 1e9)
    assert gb["zero2"] == pytest.approx((2 * PSI + 14 * PSI / 8) / 1e9)
    assert gb["zero3"] == pytest.approx(16 * PSI / 8 / 1e9)
    assert report["logits_gb_bf16"] == pytest.approx(4096 * 250_680 * 2 / 1e9)


def test_fuxi_info_reports_config_errors(capsys):
    assert main(["info", "--config", "configs/model/fuxitranyu-8b.yaml", "--set", "num_heads=5"]) == 2
    err = capsys.readouterr().err
    assert "num_heads: 5 does not divide hidden_size 4096" in err and "fuxitranyu-8b.yaml" in err


def test_zero_memory_formula_edge_cases():
    assert zero_model_state_bytes(10, 1, 3) == zero_model_state_bytes(10, 1, 0) == 160
    with pytest.raises(ValueError, match="zero stage"):
        zero_model_state_bytes(10, 2, 4)


def test_mfu_formula():
    # 8,700 tokens/s of the 8B model at 51.2 GFLOP/token on one 989 TFLOP/s H100 is about 45% (anchors.md).
    assert mfu(8_700, 51.2e9, 989.4) == pytest.approx(0.4502, abs=1e-3)
    assert mfu(2 * 8_700, 51.2e9, 989.4, num_devices=2) == pytest.approx(mfu(8_700, 51.2e9, 989.4))
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    # torch.cuda.get_device_name() of the other Hopper parts: the specific names win over the shorter ones
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0 and peak_tflops_for("NVIDIA H100 NVL") == 835.5
    assert peak_tflops_for("NVIDIA H200") == 989.4 and peak_tflops_for("NVIDIA H200 NVL") == 835.5
    assert peak_tflops_for("mystery accelerator") is None


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MiB") == 200 * 2**20 and parse_size("123") == 123


def test_convert_cli_round_trip(tmp_path, capsys):
    from fuxi.checkpoints import load_model, save_model
    from model_helpers import tiny_model

    model = tiny_model()
    save_model(model, tmp_path / "ours")
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf"),
                 "--dtype", "float32", "--shard-size", "50KB"]) == 0
    assert main(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert all((back.state_dict()[k] == v).all() for k, v in model.state_dict().items())
    assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_upcycle_cli_preserves_the_dense_function(tmp_path):
    import torch

    from fuxi.checkpoints import load_model, save_model
    from model_helpers import multilingual_ids, tiny_model

    dense = tiny_model()
    save_model(dense, tmp_path / "dense")
    assert main(["upcycle", "--checkpoint", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "moe"), "--original-languages", "en", "zh"]) == 0
    moe = load_model(tmp_path / "moe").eval()
    assert moe.config.type == "fuxitranyu_moe" and moe.config.moe.num_experts == 4
    ids = multilingual_ids()
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() <= 1e-5
