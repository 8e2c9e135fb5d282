"""An upcycled Qwen2 MoE-LPR model exports as transformers' native Qwen2MoeForCausalLM: a tiny random
Qwen2ForCausalLM (q/k/v biases, tied embeddings, GQA), built by transformers, goes through `fuxi convert from-hf`
-> `fuxi upcycle` -> `fuxi convert to-hf`; the export loads without remote code and without missing or unexpected
keys, its width-0 shared expert adds exactly 0, and its logits and greedy tokens are the dense transformers
model's (upcycling preserves the function) and ours. Drifted experts and routers (as after stage 1) check the
router mapping, the top-K renormalisation, the released code's unrenormalised top-1 (norm_topk_prob false) and
dense layers between MoE layers (mlp_only_layers); what our MoE cannot hold is refused on import."""
import json

import pytest
import torch

from fuxi.checkpoints import export_to_hf, load_model, save_model
from fuxi.checkpoints.sharded_safetensors import iter_tensors, tensor_shapes
from fuxi.launch.cli import main as fuxi
from fuxi.model.config import MoEConfig
from fuxi.model.upcycle import upcycle_model
from hf_helpers import (drift_experts_and_routers, greedy, load_native, randomize_biases, tiny_qwen2, tiny_qwen2_moe,
                        token_ids)

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """The dense transformers Qwen2 and the directories of the CLI chain from-hf -> upcycle -> to-hf."""
    tmp = tmp_path_factory.mktemp("qwen2_moe")
    torch.manual_seed(0)
    dense = randomize_biases(tiny_qwen2()).eval()
    dense.save_pretrained(tmp / "hf")
    assert fuxi(["convert", "from-hf", "--hf", str(tmp / "hf"), "--out", str(tmp / "dense")]) == 0
    assert fuxi(["upcycle", "--checkpoint", str(tmp / "dense"), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp / "moe"), "--seed", "3"]) == 0
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp / "moe"), "--out", str(tmp / "qwen2_moe"),
                 "--dtype", "float32"]) == 0
    return dense, tmp


def test_export_is_native_qwen2_moe_with_the_dense_function(upcycled):
    dense, tmp = upcycled
    config = json.loads((tmp / "qwen2_moe" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and "auto_map" not in config
    assert not list((tmp / "qwen2_moe").glob("*.py"))
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) == (4, 2, True)
    assert (config["shared_expert_intermediate_size"], config["mlp_only_layers"]) == (0, [])
    assert config["tie_word_embeddings"] and config["qkv_bias"]
    shapes = tensor_shapes(tmp / "qwen2_moe")
    assert shapes["model.layers.0.mlp.shared_expert.down_proj.weight"] == (64, 0)
    assert "lm_head.weight" not in shapes  # tied: the embedding is the head
    moe = load_native(tmp / "qwen2_moe")
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    assert moe.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the base's biases are carried
    ids = token_ids(40)
    ours = load_model(tmp / "moe").eval()
    assert (ours.config.type, ours.config.family) == ("fuxitranyu_moe", "qwen2")
    with torch.no_grad():
        want, got, mine = dense(ids).logits, moe(ids).logits, ours(ids).logits
        shared = moe.model.layers[0].mlp.shared_expert(torch.randn(5, 64))
    assert torch.equal(shared, torch.zeros(5, 64))  # the width-0 shared expert adds exactly 0
    assert (want - got).abs().max() <= 1e-4
    assert (mine - got).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(greedy(moe, prompt), greedy(dense, prompt))
    assert torch.equal(ours.generate(prompt, max_new_tokens=8), greedy(dense, prompt))


@pytest.mark.parametrize("moe_fields", [{"top_k": 2}, {"top_k": 1, "top1_code_compat": True},
                                        {"top_k": 2, "layers": [1]}], ids=["top2", "top1-code", "dense-layer0"])
def test_drifted_experts_and_router_equal_ours(upcycled, tmp_path, moe_fields):
    """After stage 1 the experts differ and the router matters: Qwen2-MoE must route and weight as we do, the
    unrenormalised top-1 included, and keep a layer left dense as its dense MLP."""
    _, tmp = upcycled
    moe = upcycle_model(load_model(tmp / "dense"), MoEConfig(num_experts=4, **moe_fields), seed=1)
    drift_experts_and_routers(moe)
    save_model(moe, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["norm_topk_prob"] is not bool(moe_fields.get("top1_code_compat"))
    assert config["mlp_only_layers"] == ([0] if "layers" in moe_fields else [])
    theirs = load_native(tmp_path / "hf")
    ids = token_ids(40)
    with torch.no_grad():
        ours = moe.eval()(ids)
        logits = theirs(ids).logits
    used = torch.stack([r.expert_ids for r in ours.routing]).unique()
    assert used.numel() == 4  # every expert gets tokens: the router's mapping is exercised
    assert (ours.logits - logits).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(moe.generate(prompt, max_new_tokens=8), greedy(theirs, prompt))


def test_export_comes_back_exactly(upcycled, tmp_path):
    """to-hf then from-hf: the same config (MoE settings from fuxi_moe), the same tensors bitwise."""
    _, tmp = upcycled
    assert fuxi(["convert", "from-hf", "--hf", str(tmp / "qwen2_moe"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_model(tmp / "moe"), load_model(tmp_path / "back")
    assert after.config == before.config
    theirs, mine = dict(iter_tensors(tmp / "moe")), dict(iter_tensors(tmp_path / "back"))
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_a_transformers_qwen2_moe_round_trips(tmp_path):
    """A Qwen2MoeForCausalLM saved by transformers (no fuxi_* fields, no shared expert, layer 0 dense through
    mlp_only_layers, untied): imported with transformers' logits; exported again, the same logits."""
    torch.manual_seed(0)
    original = randomize_biases(tiny_qwen2_moe(mlp_only_layers=[0], tie_word_embeddings=False)).eval()
    original.save_pretrained(tmp_path / "hf")
    assert fuxi(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    c = ours.config
    assert (c.type, c.family, c.attention_bias, c.tie_word_embeddings) == ("fuxitranyu_moe", "qwen2", "qkv", False)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.layers, c.moe.balance_loss_coef) == (3, 2, [1], 0.02)
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "again"),
                 "--dtype", "float32"]) == 0
    ids = token_ids(40)
    with torch.no_grad():
        want = original(ids).logits
        assert (ours(ids).logits - want).abs().max() <= 1e-5
        assert (load_native(tmp_path / "again")(ids).logits - want).abs().max() <= 1e-5


@pytest.mark.parametrize("fields, change, named", [
    ({"shared_expert_intermediate_size": 8}, {}, "shared_expert_intermediate_size 8"),
    ({"norm_topk_prob": False}, {}, "norm_topk_prob false with num_experts_per_tok 2"),
    ({"qkv_bias": False}, {}, "qkv_bias False"),
    ({"moe_intermediate_size": 48, "mlp_only_layers": [0]}, {}, "moe_intermediate_size 48 != intermediate_size 96"),
    ({}, {"fuxi_moe": {"num_experts": 3, "top_k": 1}}, "contradicts Qwen2-MoE's"),
    ({}, {"shared_expert_intermediate_size": 0, "fuxi_moe": None}, None),  # control: this one imports
])
def test_what_our_model_cannot_hold_is_refused_on_import(tmp_path, capsys, fields, change, named):
    torch.manual_seed(0)
    tiny_qwen2_moe(**fields).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code = fuxi(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    if named is None:
        assert code == 0
        return
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "ours").exists()


def test_shared_expert_weights_behind_a_zero_width_config_are_refused(tmp_path, capsys):
    """config.json says no shared expert but the files hold one: refused, naming the tensor, not dropped."""
    torch.manual_seed(0)
    tiny_qwen2_moe(shared_expert_intermediate_size=8).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "shared_expert_intermediate_size": 0}))
    capsys.readouterr()
    assert fuxi(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp.shared_expert." in err[0] and "shared_expert_intermediate_size must be 0" in err[0]
