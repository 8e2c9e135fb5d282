"""The FuxiTranyu model: exact size, activation, RoPE convention, causality, document masking, KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.kernels import gelu_fast_torch, rope_cos_sin
from fuxi.kernels.rope import apply_rope_torch
from fuxi.model import ModelConfig, build_model
from fuxi.model.attention import _varlen_boundaries, document_causal_mask
from fuxi.model.config import GhostRNNConfig, MoEConfig
from model_helpers import multilingual_ids, tiny_config, tiny_model


def published_parameter_count(vocab: int) -> int:
    """docs/methods.md §1.4, term by term."""
    h, f, layers = 4096, 16384, 30
    attention = 4 * h * h + 4 * h
    mlp = 2 * h * f + f + h
    norms = 2 * h
    return layers * (attention + mlp + norms) + 2 * vocab * h + h


def test_8b_parameter_count_on_meta_device():
    model = build_model(ModelConfig(), device="meta")
    assert model.num_parameters() == 8_094_724_096 == published_parameter_count(250_680)
    padded = build_model(ModelConfig(pad_vocab_multiple=128), device="meta")
    assert padded.config.padded_vocab_size == 250_752
    assert padded.num_parameters() == 8_095_313_920 == published_parameter_count(250_752)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_architecture_shapes_and_biases():
    model = build_model(ModelConfig(), device="meta")
    names = dict(model.named_parameters())
    layer = "model.layers.0."
    for proj in "qkvo":
        assert names[f"{layer}self_attn.{proj}_proj.weight"].shape == (4096, 4096)
        assert names[f"{layer}self_attn.{proj}_proj.bias"].shape == (4096,)
    assert names[f"{layer}mlp.up_proj.weight"].shape == (16384, 4096)
    assert names[f"{layer}mlp.up_proj.bias"].shape == (16384,)
    assert names[f"{layer}mlp.down_proj.bias"].shape == (4096,)
    assert "lm_head.bias" not in names
    assert names["lm_head.weight"] is not names["model.embed_tokens.weight"]  # untied
    assert not any("gate_proj" in n for n in names)  # non-gated MLP


@pytest.mark.hf
def test_gelu_fast_matches_formula_and_differs_from_erf_gelu():
    x = torch.linspace(-6, 6, 10001, dtype=torch.float64)
    formula = 0.5 * x * (1 + torch.tanh(0.7978845608 * x * (1 + 0.044715 * x**2)))
    assert torch.allclose(gelu_fast_torch(x.float()).double(), formula, atol=1e-6)
    from transformers.activations import ACT2FN

    assert torch.allclose(gelu_fast_torch(x.float()), ACT2FN["gelu_fast"](x.float()), atol=1e-7)
    diff = (gelu_fast_torch(x) - F.gelu(x)).abs().max().item()
    assert 1e-4 < diff < 1e-2


def test_rope_rotate_half_equals_complex_rotation():
    """Independent reference: rotate-half RoPE is a complex rotation of the pairs (x_i, x_{i + d/2})."""
    batch, seq, heads, dim, theta = 2, 7, 3, 16, 10_000.0
    q, k = torch.randn(batch, seq, heads, dim, dtype=torch.float64), torch.randn(batch, seq, heads, dim,
                                                                                  dtype=torch.float64)
    positions = torch.arange(seq)[None]
    cos, sin = rope_cos_sin(positions, dim, theta, torch.float64)
    q_rot, _ = apply_rope_torch(q, k, cos, sin)
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freqs  # [seq, dim/2]
    z = torch.complex(q[..., : dim // 2], q[..., dim // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :,
                                                                                                            None]
    expected = torch.cat([z.real, z.imag], dim=-1)
    assert torch.allclose(q_rot, expected, atol=1e-6)


def test_forward_backward_tiny_model():
    model = tiny_model().train()
    ids = multilingual_ids()
    out = model(ids[:, :-1], labels=ids[:, 1:])
    reference = F.cross_entropy(model(ids[:, :-1]).logits.reshape(-1, 300).float(), ids[:, 1:].reshape(-1),
                                reduction="none").view(out.token_losses.shape)
    assert torch.allclose(out.token_losses, reference, atol=1e-5)
    assert torch.isclose(out.loss, reference.mean(), atol=1e-6)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_ignore_index_positions_have_zero_loss_and_are_excluded_from_mean():
    model = tiny_model()
    ids = multilingual_ids()
    labels = ids[:, 1:].clone()
    labels[:, ::3] = -100
    out = model(ids[:, :-1], labels=labels)
    assert (out.token_losses[labels == -100] == 0).all()
    assert torch.isclose(out.loss, out.token_losses[labels != -100].mean(), atol=1e-6)


def test_initial_loss_near_log_vocab():
    model = build_model(tiny_config(vocab_size=4096, init_std=0.02))
    ids = torch.randint(0, 4096, (2, 64))
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss.item()
    assert abs(loss - math.log(4096)) < 0.1


def test_init_scaled_residual_projections():
    config = tiny_config(hidden_size=256, num_heads=4, ffn_hidden_size=1024, num_layers=8, init_std=0.02)
    model = build_model(config)
    o_std = torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.model.layers]).std().item()
    q_std = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in model.model.layers]).std().item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / math.sqrt(16)) < 0.0005
    assert all((layer.mlp.up_proj.bias == 0).all() for layer in model.model.layers)


def test_causality_future_tokens_never_change_earlier_logits():
    model = tiny_model()
    ids = multilingual_ids()[:, :32]
    base = model(ids).logits
    for t in (0, 10, 31):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 17) % 300
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t]) or torch.allclose(logits[:, :t], base[:, :t], atol=1e-6)
        if t < 31:
            assert not torch.allclose(logits[:, t:], base[:, t:], atol=1e-4)


def test_document_masking_matches_documents_run_alone():
    model = tiny_model(document_masking=True)
    ids = multilingual_ids()
    doc_a, doc_b = ids[0, :20], ids[2, :24]
    packed = torch.cat([doc_a, doc_b])[None]
    doc_ids = torch.tensor([[0] * 20 + [1] * 24])
    logits = model(packed, doc_ids=doc_ids).logits
    alone_b = model(doc_b[None], positions=torch.arange(20, 44)[None]).logits
    alone_a = model(doc_a[None]).logits
    assert torch.allclose(logits[:, 20:], alone_b, atol=1e-5)
    assert torch.allclose(logits[:, :20], alone_a, atol=1e-5)
    # RoPE is relative: doc b on its own positions 0.. gives the same logits up to rounding.
    assert torch.allclose(logits[:, 20:], model(doc_b[None]).logits, atol=1e-4)
    unmasked = tiny_model(document_masking=False)(packed, doc_ids=doc_ids).logits
    assert not torch.allclose(unmasked[:, 20:], alone_b, atol=1e-3)


def test_document_mask_and_varlen_boundaries():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [3, 4, 4, 4, 5]])
    mask = document_causal_mask(doc_ids)[:, 0]
    assert mask[0, 3].tolist() == [False, False, True, True, False]
    assert mask[1, 4].tolist() == [False, False, False, False, True]
    cu, max_len = _varlen_boundaries(doc_ids)
    assert cu.tolist() == [0, 2, 5, 6, 9, 10] and max_len == 3


def test_generate_with_kv_cache_matches_full_recompute():
    model = tiny_model()
    prompt = multilingual_ids()[:, :8]
    tokens = model.generate(prompt, max_new_tokens=10)
    assert tokens.shape == (prompt.shape[0], 18)
    logits = model(tokens).logits
    assert torch.equal(logits[:, 7:-1].argmax(-1), tokens[:, 8:])


def test_generate_stops_at_eos():
    model = tiny_model()
    prompt = multilingual_ids()[:1, :8]
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 9])  # make the second generated token the end-of-sequence token
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] <= 10 and int(stopped[0, -1]) == eos


def test_activation_checkpointing_gives_identical_gradients():
    ids = multilingual_ids()
    grads = []
    for ckpt in (False, True):
        model = tiny_model(activation_checkpointing=ckpt).train()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_padded_vocab_rows_exist_but_generation_never_emits_them():
    model = tiny_model(pad_vocab_multiple=128)
    assert model.lm_head.weight.shape[0] == 384
    with torch.no_grad():
        model.lm_head.weight[300:] = 10.0  # make padded ids the most likely
    tokens = model.generate(multilingual_ids()[:, :4], max_new_tokens=4)
    assert int(tokens.max()) < 300


def test_flops_per_token_formula():
    model = build_model(ModelConfig(), device="meta")
    n_no_embed = 8_094_724_096 - 250_680 * 4096
    assert model.flops_per_token(4096) == 6 * n_no_embed + 12 * 30 * 4096 * 4096


@pytest.mark.gpu
def test_bf16_cuda_forward_matches_fp32():
    model = tiny_model().cuda()
    ids = multilingual_ids().cuda()
    ref = model(ids).logits.float()
    low = model.to(torch.bfloat16)(ids).logits.float()
    assert (low - ref).abs().max() < 0.05


@pytest.mark.parametrize("config, key", [
    (ModelConfig(kernels="tritn"), "kernels"),
    (ModelConfig(attention="flsh"), "attention"),
    (ModelConfig(type="ghostrnn_lm", ghostrnn=GhostRNNConfig(gate_input="half")), "ghostrnn.gate_input"),
    (ModelConfig(type="fuxitranyu_moe", moe=MoEConfig(expert_compute="cuda")), "moe.expert_compute"),
])
def test_choice_fields_are_checked_when_built_in_code(config, key):
    """The Literal fields are checked by validate(), not only by from_dict on load."""
    with pytest.raises(ConfigError) as err:
        config.validate()
    assert err.value.key == key and "is not one of" in err.value.reason
