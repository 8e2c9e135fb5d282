"""The trainer and PreAlign, unchanged, on Llama-family architectures (gated MLP, grouped-query attention, no
biases, llama3 RoPE; and Qwen2's q/k/v bias with tied embeddings): `fuxi pretrain` under ZeRO-1 and ZeRO-3
gives the same fp32 losses, they fall, and the final export is the same family; `prealign_init` runs on it."""
import json

import pytest

from fuxi.checkpoints import load_model
from test_prealign_trainer import prealign_config, records, toy_table
from trainer_helpers import run_config, run_pretrain, tiny_training_dataset, train_losses, write_config

LLAMA = {"family": "llama", "mlp": "swiglu", "attention_bias": "none", "mlp_bias": False, "num_heads": 4,
         "num_kv_heads": 2, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}}
QWEN2 = {"family": "qwen2", "mlp": "swiglu", "attention_bias": "qkv", "mlp_bias": False, "num_heads": 4,
         "num_kv_heads": 1, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_training_dataset(tmp_path_factory)


def _model(arch: dict) -> dict:
    return {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "ffn_hidden_size": 96, "max_seq_len": 32,
            "kernels": "torch", **arch}


@pytest.mark.parametrize("arch", [LLAMA, pytest.param(QWEN2, marks=pytest.mark.slow)], ids=["llama", "qwen2"])
def test_pretrain_zero1_equals_zero3_on_the_family(data, tmp_path, arch):
    losses = {}
    for stage in (1, 3):
        out = tmp_path / f"zero{stage}"
        cfg = run_config(data, out, model=_model(arch),
                         parallelism={"zero_stage": stage, "micro_batch": 2, "precision": "fp32"},
                         schedule={"total_steps": 6, "warmup_steps": 1, "global_batch": 4},
                         checkpoint={"every_steps": 100, "keep_last": 1},
                         run={"output_dir": str(out), "seed": 7, "export_final": True})
        run_pretrain(write_config(cfg, tmp_path / f"zero{stage}.yaml"))
        losses[stage] = train_losses(out)
        final = load_model(out / "final")
        assert final.config.family == arch["family"] and final.config.num_kv_heads == arch["num_kv_heads"]
    assert sorted(losses[1]) == list(range(1, 7))
    for step in losses[1]:  # fp32; ZeRO-3 only partitions the same computation
        assert abs(losses[1][step] - losses[3][step]) <= 1e-5, (step, losses[1][step], losses[3][step])
    assert losses[1][6] < losses[1][1]


def test_prealign_init_on_a_llama_architecture(data, tmp_path):
    out = tmp_path / "init"
    cfg = prealign_config(data, out, steps=6, table=toy_table(data, tmp_path / "table.jsonl"))
    cfg["model"] = _model(LLAMA)
    run_pretrain(write_config(cfg, tmp_path / "init.yaml"))
    align = [r["align/loss"] for r in records(out, "train")]
    assert len(align) == 6 and align[-1] < align[0]
    report = json.loads((out / "alignment_report.json").read_text())
    assert report["after"]["spaces"] == ["embedding", "layer 1", "layer 2", "output embedding"]
    assert load_model(out / "final").config.family == "llama"
