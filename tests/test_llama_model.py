"""The Llama-family switches of the one decoder trunk: published parameter counts of the shipped configs,
family refusals, grouped-query attention under cached decoding and document masking, tied embeddings."""
import json

import pytest
import torch

from fuxi.common.errors import ConfigError
from fuxi.launch.cli import main
from fuxi.model import ModelConfig, build_model, load_model_config


@pytest.mark.parametrize("name, params", [
    ("llama3-8b", 8_030_261_248),    # Meta-Llama-3-8B
    ("qwen2-1.5b", 1_543_714_304),   # Qwen2-1.5B (tied: the embedding counts once)
    ("mistral-7b", 7_248_023_552),   # Mistral-7B-v0.3
    ("fuxitranyu-8b", 8_094_724_096),
])
def test_fuxi_info_prints_the_published_counts(capsys, name, params):
    assert main(["info", f"configs/model/{name}.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"{params:,}" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["parameters"] == params
    assert report["architecture"].startswith(load_model_config(f"configs/model/{name}.yaml").family)


@pytest.mark.parametrize("fields, named", [
    ({"family": "qwen2", "mlp": "swiglu", "attention_bias": "none", "mlp_bias": False}, "attention_bias"),
    ({"family": "mistral", "mlp": "swiglu", "attention_bias": "none"}, "mlp_bias"),
    ({"family": "llama", "mlp": "gelu"}, "mlp"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"num_kv_heads": 2}, "num_kv_heads"),  # the fuxitranyu family is multi-head attention
])
def test_family_refuses_switches_its_class_cannot_hold(fields, named):
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=64, **fields)
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert err.value.key == named


def _tiny_llama(**overrides):
    config = load_model_config("configs/model/llama-tiny.yaml")
    for key, value in {"kernels": "torch", "vocab_size": 97, "document_masking": True, **overrides}.items():
        setattr(config, key, value)
    config.validate()
    torch.manual_seed(0)
    return build_model(config).eval()


def test_gqa_cached_decoding_equals_the_full_forward():
    model = _tiny_llama()
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 128)  # 2 kv heads of 32
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], kv_cache=model.empty_kv_cache())
        step = model(ids[:, 12:15], kv_cache=out.kv_cache)  # several new tokens: the bottom-right mask
        last = model(ids[:, 15:16], kv_cache=step.kv_cache)
    assert torch.allclose(torch.cat([out.logits, step.logits, last.logits], 1), full[:, :16], atol=1e-5)


def test_gqa_document_masking_equals_separate_documents():
    model = _tiny_llama()
    a, b = (torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 9))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), doc_ids=doc_ids, positions=positions).logits
        alone = torch.cat([model(a).logits, model(b).logits], 1)
    assert torch.allclose(packed, alone, atol=1e-5)


def test_tied_embeddings_share_one_matrix_saved_once(tmp_path):
    from fuxi.checkpoints import load_model, save_model

    model = _tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    labels = torch.randint(0, 97, (1, 10))
    loaded.train()
    loaded(ids, labels=labels).loss.backward()  # the fused loss reaches the shared matrix from both ends
    assert loaded.model.embed_tokens.weight.grad is not None
