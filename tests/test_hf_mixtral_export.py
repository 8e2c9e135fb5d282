"""An upcycled Llama/Mistral MoE-LPR model exports as transformers' native MixtralForCausalLM: a tiny random
LlamaForCausalLM (GQA, llama3 RoPE scaling) and MistralForCausalLM (one k/v head), built by transformers, go
through `fuxi convert from-hf` -> `fuxi upcycle` -> `fuxi convert to-hf`; the export loads without remote code
and without missing or unexpected keys, and its logits and greedy tokens are the dense transformers model's
(upcycling preserves the function) and our MoE's. Experts and routers drifted apart (as after stage 1) check
the router and w1/w2/w3 mapping and Mixtral's top-K renormalisation; what Mixtral cannot hold is refused."""
import json

import pytest
import torch

from fuxi.checkpoints import CheckpointError, export_to_hf, load_model, save_model
from fuxi.launch.cli import main as fuxi
from fuxi.model import ModelConfig, build_model
from fuxi.model.config import MoEConfig
from fuxi.model.upcycle import upcycle_model
from hf_helpers import (VOCAB, drift_experts_and_routers, greedy, load_native, rope_of, tiny_llama, tiny_mistral,
                        tiny_mixtral, token_ids)

pytestmark = pytest.mark.hf

FAMILIES = {"llama": tiny_llama, "mistral": tiny_mistral}


def _ids():
    return token_ids(40)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def upcycled(request, tmp_path_factory):
    """The dense transformers model and the directories of the CLI chain from-hf -> upcycle -> to-hf."""
    tmp = tmp_path_factory.mktemp(f"mixtral_{request.param}")
    torch.manual_seed(0)
    dense = FAMILIES[request.param]().eval()
    dense.save_pretrained(tmp / "hf")
    assert fuxi(["convert", "from-hf", "--hf", str(tmp / "hf"), "--out", str(tmp / "dense")]) == 0
    assert fuxi(["upcycle", "--checkpoint", str(tmp / "dense"), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp / "moe"), "--seed", "3"]) == 0
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp / "moe"), "--out", str(tmp / "mixtral"),
                 "--dtype", "float32"]) == 0
    return request.param, dense, tmp


def test_export_is_native_mixtral_with_the_dense_function(upcycled):
    family, dense, tmp = upcycled
    config = json.loads((tmp / "mixtral" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    assert not list((tmp / "mixtral").glob("*.py"))
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["num_key_value_heads"] == dense.config.num_key_value_heads
    assert config["rms_norm_eps"] == dense.config.rms_norm_eps
    assert config["rope_parameters"]["rope_type"] == ("llama3" if family == "llama" else "default")
    mixtral = load_native(tmp / "mixtral")
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    assert rope_of(mixtral.config) == rope_of(dense.config)
    ids = _ids()
    ours = load_model(tmp / "moe").eval()
    assert ours.config.type == "fuxitranyu_moe" and ours.config.family == family
    with torch.no_grad():
        want, got, mine = dense(ids).logits, mixtral(ids).logits, ours(ids).logits
    assert (want - got).abs().max() <= 1e-4
    assert (mine - got).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(greedy(mixtral, prompt), greedy(dense, prompt))


@pytest.mark.parametrize("top_k", [1, 2])
def test_drifted_experts_and_router_equal_ours(upcycled, tmp_path, top_k):
    """After stage 1 the experts differ and the router matters: Mixtral must route and weight as we do."""
    _, _, tmp = upcycled
    moe = upcycle_model(load_model(tmp / "dense"), MoEConfig(num_experts=4, top_k=top_k), seed=1)
    drift_experts_and_routers(moe)
    save_model(moe, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "mixtral")
    mixtral = load_native(tmp_path / "mixtral")
    ids = _ids()
    with torch.no_grad():
        ours = moe.eval()(ids)
        theirs = mixtral(ids)
    used = torch.stack([r.expert_ids for r in ours.routing]).unique()
    assert used.numel() == 4  # every expert gets tokens: the router's mapping is exercised
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(moe.generate(prompt, max_new_tokens=8), greedy(mixtral, prompt))


def _tiny_llama_moe(moe: MoEConfig, **fields):
    config = ModelConfig(**{**dict(family="llama", mlp="swiglu", attention_bias="none", mlp_bias=False,
                                   vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_heads=4,
                                   kernels="torch"), **fields})
    config.validate()
    return upcycle_model(build_model(config), moe)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scalings_carry_into_mixtral(tmp_path, rope):
    """linear and dynamic RoPE (past max_seq_len, where dynamic NTK changes the base) compute as ours."""
    from fuxi.model.config import RopeScalingConfig

    torch.manual_seed(0)
    moe = _tiny_llama_moe(MoEConfig(num_experts=3, top_k=2), max_seq_len=32, num_kv_heads=2, rope_theta=5e5,
                          rms_norm_eps=1e-6, rope_scaling=RopeScalingConfig(**rope))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(moe, tmp_path / "ours")
    export_to_hf(tmp_path / "ours", tmp_path / "mixtral")
    mixtral = load_native(tmp_path / "mixtral")
    assert mixtral.config.rope_parameters["rope_type"] == rope["rope_type"]
    ids = _ids()  # 40 positions, past max_seq_len 32
    with torch.no_grad():
        assert (moe.eval()(ids).logits - mixtral(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("fields, moe, named", [
    ({"attention_bias": "all"}, {}, "attention_bias 'all'"),
    ({"mlp_bias": True}, {}, "mlp_bias true"),
    ({}, {"layers": [1]}, "moe.layers [1]"),
    ({}, {"top_k": 1, "top1_code_compat": True}, "moe.top1_code_compat true"),
])
def test_what_mixtral_cannot_hold_is_refused(tmp_path, fields, moe, named):
    save_model(_tiny_llama_moe(MoEConfig(num_experts=2, **{"top_k": 2, **moe}), **fields), tmp_path / "ours")
    with pytest.raises(CheckpointError) as err:
        export_to_hf(tmp_path / "ours", tmp_path / "hf")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


# ---- back: `convert from-hf` of a MixtralForCausalLM directory ------------------------------------------------

def test_export_comes_back_exactly(upcycled, tmp_path):
    """to-hf then from-hf: the same config (family and MoE settings from fuxi_family/fuxi_moe), the same
    tensors bitwise, logits equal to Mixtral's."""
    from fuxi.checkpoints.sharded_safetensors import iter_tensors

    _, _, tmp = upcycled
    assert fuxi(["convert", "from-hf", "--hf", str(tmp / "mixtral"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_model(tmp / "moe"), load_model(tmp_path / "back").eval()
    assert after.config == before.config
    theirs = dict(iter_tensors(tmp / "moe"))
    mine = dict(iter_tensors(tmp_path / "back"))
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    ids = _ids()
    with torch.no_grad():
        assert (after(ids).logits - load_native(tmp / "mixtral")(ids).logits).abs().max() <= 1e-5


def test_a_transformers_mixtral_round_trips(tmp_path):
    """A MixtralForCausalLM saved by transformers (no fuxi_* fields): imported as a top-2 MoE of every layer,
    family mistral, its logits transformers' own; exported again, the same logits."""
    torch.manual_seed(0)
    original = tiny_mixtral().eval()
    original.save_pretrained(tmp_path / "hf")
    assert fuxi(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    assert (ours.config.type, ours.config.family, ours.config.num_kv_heads) == ("fuxitranyu_moe", "mistral", 2)
    assert (ours.config.moe.num_experts, ours.config.moe.top_k, ours.config.moe.balance_loss_coef) == (3, 2, 0.02)
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "again"),
                 "--dtype", "float32"]) == 0
    ids = _ids()
    with torch.no_grad():
        want = original(ids).logits
        assert (ours(ids).logits - want).abs().max() <= 1e-5
        assert (load_native(tmp_path / "again")(ids).logits - want).abs().max() <= 1e-5


@pytest.mark.parametrize("change, named", [
    ({"router_jitter_noise": 0.1}, "router_jitter_noise 0.1"),
    ({"sliding_window": 16}, "sliding_window 16"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"fuxi_family": "qwen2"}, "fuxi_family 'qwen2'"),
    ({"fuxi_moe": {"num_experts": 3, "top_k": 1}}, "contradicts Mixtral's"),
])
def test_what_our_model_cannot_hold_is_refused_on_import(tmp_path, capsys, change, named):
    torch.manual_seed(0)
    tiny_mixtral().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    capsys.readouterr()
    assert fuxi(["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "ours").exists()
