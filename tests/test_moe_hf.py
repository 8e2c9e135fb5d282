"""Hugging Face export/import of FuxiTranyu-MoE: transformers loads the export (trust_remote_code, offline) with
logits, greedy generation and balance loss equal to ours; the round trip back is bitwise, config included."""
import json

import pytest
import torch

from fuxi.checkpoints import CheckpointError, import_from_hf, load_model, save_model
from fuxi.checkpoints.hf_import import load_hf_reference
from fuxi.checkpoints.sharded_safetensors import iter_tensors
from fuxi.launch.cli import main as fuxi
from fuxi.model.config import MoEConfig
from fuxi.model.upcycle import upcycle_model
from model_helpers import multilingual_ids, tiny_model

pytestmark = pytest.mark.hf

SHARD = 80_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An upcycled model whose experts have drifted apart (as after stage 1), exported through `fuxi convert`."""
    tmp = tmp_path_factory.mktemp("moe_hf")
    dense = tiny_model(num_layers=3, pad_vocab_multiple=128)
    moe = upcycle_model(dense, MoEConfig(num_experts=4, top_k=2, layers=[0, 2], original_languages=["en"]), seed=5)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts." in name or ".router." in name:
                p.add_(torch.randn_like(p) * 0.05)
    save_model(moe, tmp / "ours", max_shard_bytes=SHARD)
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp / "ours"), "--out", str(tmp / "hf"),
                 "--dtype", "float32", "--shard-size", str(SHARD)]) == 0
    return moe.eval(), tmp, load_hf_reference(tmp / "hf")


def test_export_layout_and_config(exported):
    moe, tmp, _ = exported
    hf = tmp / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "fuxitranyu_moe"
    assert config["architectures"] == ["FuxiTranyuMoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fuxitranyu_moe.FuxiTranyuMoeForCausalLM"
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_layers"]) == (4, 2, [0, 2])
    assert config["norm_topk_prob"] is True and config["fuxi_moe"]["original_languages"] == ["en"]
    for name in ("modeling_fuxitranyu_moe.py", "configuration_fuxitranyu_moe.py", "modeling_fuxitranyu.py",
                 "configuration_fuxitranyu.py"):
        assert (hf / name).is_file()
    names = {name for name, _ in iter_tensors(hf)}
    assert names == set(moe.state_dict())
    assert {"model.layers.0.mlp.router.weight", "model.layers.2.mlp.experts.3.down_proj.bias",
            "model.layers.1.mlp.up_proj.weight"} <= names


def test_transformers_logits_and_balance_loss_equal_ours(exported):
    moe, _, reference = exported
    ids = multilingual_ids()
    mask = ids != 0
    with torch.no_grad():
        ours = moe(ids, loss_mask=mask)
        theirs = reference(ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
    assert (ours.logits.double() - theirs.logits.double()).abs().max().item() <= 1e-5
    kl = torch.nn.functional.kl_div(theirs.logits.double().log_softmax(-1), ours.logits.double().log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1)
    assert kl.mean().item() <= 1e-9
    assert len(theirs.router_logits) == 2
    with torch.no_grad():
        unmasked = moe(ids).aux_losses["balance"]
    torch.testing.assert_close(theirs.aux_loss, unmasked, rtol=1e-5, atol=1e-6)


def test_transformers_loss_is_ours_plus_the_weighted_balance_loss(exported):
    """From unshifted labels (transformers shifts them), with router_aux_loss_coef times the balance loss added
    when the router logits are asked for; the coefficient is the MoEConfig's balance_loss_coef."""
    moe, _, reference = exported
    ids = multilingual_ids()
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        ours = moe(ids, labels=shifted)
        plain = reference(ids, labels=ids)
        with_aux = reference(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(plain.loss, ours.loss)
    balance = moe.config.moe.balance_loss_coef * ours.aux_losses["balance"]
    torch.testing.assert_close(with_aux.loss, ours.loss + balance)


def test_transformers_generate_matches_ours(exported):
    moe, _, reference = exported
    prompt = multilingual_ids()[:, :8]
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(moe.generate(prompt, max_new_tokens=8), theirs)


def test_round_trip_is_bitwise(exported, tmp_path):
    moe, tmp, _ = exported
    assert fuxi(["convert", "from-hf", "--hf", str(tmp / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert back.config.moe == moe.config.moe
    assert back.config.type == "fuxitranyu_moe"
    for name, tensor in moe.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def _export_with_config(exported, tmp_path, edit):
    _, tmp, _ = exported
    hf = tmp_path / "hf"
    hf.mkdir()
    for path in (tmp / "hf").iterdir():
        (hf / path.name).write_bytes(path.read_bytes())
    config = json.loads((hf / "config.json").read_text())
    edit(config)
    (hf / "config.json").write_text(json.dumps(config))
    return hf


def test_import_without_fuxi_fields_reads_the_routing_fields(exported, tmp_path):
    moe, _, _ = exported
    hf = _export_with_config(exported, tmp_path, lambda c: c.pop("fuxi_moe"))
    import_from_hf(hf, tmp_path / "back")
    back = load_model(tmp_path / "back")
    assert (back.config.moe.num_experts, back.config.moe.top_k, back.config.moe.layers) == (4, 2, [0, 2])
    ids = multilingual_ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, moe(ids).logits)


def test_import_rejects_contradicting_routing_fields(exported, tmp_path):
    def edit(config):
        config["num_experts_per_tok"] = 3

    hf = _export_with_config(exported, tmp_path, edit)
    with pytest.raises(CheckpointError, match="contradicts the routing fields"):
        import_from_hf(hf, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_native_format_is_refused_for_moe(exported, tmp_path, capsys):
    _, tmp, _ = exported
    assert fuxi(["convert", "to-hf", "--checkpoint", str(tmp / "ours"), "--out", str(tmp_path / "hf"),
                 "--format", "native"]) == 2
    assert "MoE-LPR has no native transformers class" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
