"""GhostGRU cells, the multi-layer GhostGRU and the GhostRNN language model (docs/methods.md §4.6, each item tested).

References are independent of the code under test: torch.nn.GRU, the cost formulas written out from
docs/methods.md §4.3, F.cross_entropy on explicit logits, and explicit loops.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import from_dict
from fuxi.kernels.ghost_gru import GHOST_ACTIVATIONS
from fuxi.model import build_model, load_model_config
from fuxi.model.config import GhostRNNConfig, ModelConfig
from fuxi.model.ghostrnn import (GhostGRU, GhostGRUCell, GhostGRUShape, GhostRNNForCausalLM,
                            dimension_cosine_similarity, intrinsic_size, redundancy_fraction)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


# (feed_ghost_back, gate_input): variant A with full gates, variant A with intrinsic gates, variant B.
SWITCHES = [(True, "full"), (True, "intrinsic"), (False, "intrinsic")]
ACTS = {"identity": lambda q: q, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


def gru_params(d: int, h: int) -> int:
    return 3 * h * (d + h) + 6 * h  # docs/methods.md §4.3, PyTorch layout with two bias sets


def variant_a_params(d: int, h: int, m: int) -> int:
    return 3 * m * (d + h) + 6 * m + m * (h - m) + (h - m)


def variant_b_params(d: int, h: int, m: int) -> int:
    return 3 * m * (d + m) + 6 * m + m * (h - m) + (h - m)


def tiny_lm_config(**overrides) -> ModelConfig:
    ghost = overrides.pop("ghostrnn", GhostRNNConfig(ratio=2, feed_ghost_back=True, gate_input="full"))
    fields = dict(type="ghostrnn_lm", vocab_size=97, hidden_size=24, num_layers=2, num_heads=4,
                  kernels="torch", ghostrnn=ghost)
    fields.update(overrides)
    config = ModelConfig(**fields)
    config.validate()
    return config


# ---- 4.6.1 shapes and slices -----------------------------------------------------------------------------

@pytest.mark.parametrize("feed, gate", SWITCHES)
@pytest.mark.parametrize("ratio, act", [(2, "tanh"), (3, "relu"), (4, "identity")])
def test_shapes_and_ghost_slice_is_cheap_map_of_intrinsic(feed, gate, ratio, act):
    d, h, batch, steps, layers = 5, 10, 3, 6, 2
    rnn = GhostGRU(d, h, layers, ratio, feed, gate, act, impl="torch")
    out, state = rnn(torch.randn(batch, steps, d))
    m = math.ceil(h / ratio)
    assert out.shape == (batch, steps, h)
    assert state.shape == (layers, batch, h if feed else m)
    last = rnn.layers[-1]
    assert last.shape.intrinsic == m and last.shape.ghosts == h - m
    expected_ghost = ACTS[act](out[..., :m] @ last.ghost_weight.t() + last.ghost_bias)
    torch.testing.assert_close(out[..., m:], expected_ghost, rtol=0, atol=1e-6)
    # The carried state is the first Hs features of the last output.
    torch.testing.assert_close(state[-1], out[:, -1, : state.shape[-1]])


def test_intrinsic_size_is_ceiling():
    assert [intrinsic_size(10, s) for s in (1, 2, 3, 4, 10)] == [10, 5, 4, 3, 1]


# ---- 4.6.2 s = 1 is torch.nn.GRU -------------------------------------------------------------------------

@pytest.mark.parametrize("feed, gate", SWITCHES)
@pytest.mark.parametrize("layers", [1, 3])
def test_ratio_one_equals_torch_gru(feed, gate, layers):
    d, h = 7, 12
    gru = torch.nn.GRU(d, h, num_layers=layers, batch_first=True)
    ghost = GhostGRU(d, h, layers, ratio=1, feed_ghost_back=feed, gate_input=gate, impl="torch").load_gru_(gru)
    x = torch.randn(4, 9, d, requires_grad=True)
    h0 = torch.randn(layers, 4, h)
    ref_out, ref_state = gru(x, h0)
    out, state = ghost(x, h0)
    assert (out - ref_out).abs().max() < 1e-6
    assert (state - ref_state).abs().max() < 1e-6
    weights = torch.randn_like(out)
    (ref_grad,) = torch.autograd.grad((ref_out * weights).sum(), x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # Weight gradients too (nn.GRU's weight_hh is our [weight_hh_rz; weight_hh_n]).
    (ref_w,) = torch.autograd.grad((gru(x, h0)[0] * weights).sum(), gru.weight_hh_l0)
    w_rz, w_n = torch.autograd.grad((ghost(x, h0)[0] * weights).sum(),
                                    [ghost.layers[0].weight_hh_rz, ghost.layers[0].weight_hh_n])
    torch.testing.assert_close(torch.cat([w_rz, w_n]), ref_w, rtol=1e-5, atol=1e-5)


def test_load_gru_refuses_ghost_layers():
    with pytest.raises(ValueError, match="ratio"):
        GhostGRU(4, 8, 1, ratio=2).load_gru_(torch.nn.GRU(4, 8, batch_first=True))


# ---- 4.6.3 parameter counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("d, h, ratio", [(16, 16, 2), (16, 16, 3), (7, 10, 3), (32, 20, 4), (5, 9, 1)])
def test_parameter_count_matches_methods_formulas(d, h, ratio):
    m = math.ceil(h / ratio)
    count = lambda feed, gate: sum(p.numel() for p in GhostGRUCell(d, h, ratio, feed, gate).parameters())
    assert count(True, "full") == variant_a_params(d, h, m)
    assert count(False, "intrinsic") == variant_b_params(d, h, m)
    # Variant A with intrinsic gates: the gates read m features, the candidate all h.
    assert count(True, "intrinsic") == 3 * m * d + 2 * m * m + m * h + 6 * m + m * (h - m) + (h - m)
    assert GhostGRUShape.of(d, h, ratio, True, "full").num_parameters() == variant_a_params(d, h, m)
    assert GhostGRUShape.of(d, h, ratio, False, "intrinsic").num_parameters() == variant_b_params(d, h, m)
    if ratio == 1:
        assert count(True, "full") == gru_params(d, h) == sum(p.numel() for p in torch.nn.GRU(d, h).parameters())


def test_macs_are_parameters_without_biases():
    for feed, gate in SWITCHES:
        shape = GhostGRUShape.of(24, 30, 3, feed, gate)
        cell = GhostGRUCell(24, 30, 3, feed, gate)
        weights = sum(p.numel() for n, p in cell.named_parameters() if "bias" not in n)
        assert shape.macs_per_step() == weights


def test_lm_parameter_count_and_log_at_build(caplog):
    config = tiny_lm_config(ghostrnn=GhostRNNConfig(ratio=3, feed_ghost_back=False, gate_input="intrinsic"))
    with caplog.at_level(logging.INFO, logger="fuxi.model.ghostrnn"):
        model = build_model(config)
    h, v, m = config.hidden_size, config.padded_vocab_size, math.ceil(config.hidden_size / 3)
    expected = 2 * v * h + config.num_layers * variant_b_params(h, h, m)
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - v * h
    assert f"{expected:,}" in caplog.text and "variant B" in caplog.text
    # The meta-device build that `fuxi info` uses counts the same.
    assert build_model(config, device="meta").num_parameters() == expected


# ---- 4.6.7 savings at D = H ------------------------------------------------------------------------------

def test_ratio_two_saves_46_and_58_percent_at_d_equals_h():
    h = 1024
    gru = GhostGRUCell(h, h, ratio=1)
    a = GhostGRUCell(h, h, ratio=2, feed_ghost_back=True, gate_input="full")
    b = GhostGRUCell(h, h, ratio=2, feed_ghost_back=False, gate_input="intrinsic")
    n = lambda cell: sum(p.numel() for p in cell.parameters())
    assert n(gru) == gru_params(h, h)
    assert abs((1 - n(a) / n(gru)) - 0.46) < 0.01   # (3H^2 + H^2/4) / 6H^2 = 54% kept
    assert abs((1 - n(b) / n(gru)) - 0.58) < 0.01   # 2.5H^2 / 6H^2 = 42% kept


# ---- 4.6.4 the cheap operation is stateless and per step; gradients ------------------------------------

def test_ghost_weights_feed_the_recurrence_only_in_variant_a():
    x = torch.randn(2, 6, 5)
    for feed, gate in SWITCHES:
        cell = GhostGRUCell(5, 12, ratio=3, feed_ghost_back=feed, gate_input=gate, ghost_act="tanh")
        before, _ = cell.scan(x)
        with torch.no_grad():
            cell.ghost_weight.add_(0.5 * torch.randn_like(cell.ghost_weight))
        after, _ = cell.scan(x)
        m = cell.shape.intrinsic
        assert torch.equal(before[:, 0, :m], after[:, 0, :m])       # step 0 never sees a ghost
        assert (before[..., m:] - after[..., m:]).abs().max() > 1e-3  # ghosts do change
        changed_later = (before[:, 1:, :m] - after[:, 1:, :m]).abs().max() > 1e-4
        assert bool(changed_later) == feed                          # fed back only in variant A


@pytest.mark.parametrize("feed, gate", SWITCHES)
def test_gradients_reach_ghost_map_and_recurrence(feed, gate):
    cell = GhostGRUCell(5, 12, ratio=3, feed_ghost_back=feed, gate_input=gate, ghost_act="tanh")
    x, h0 = torch.randn(2, 5, 5), torch.randn(2, cell.shape.state_size)
    m = cell.shape.intrinsic
    # Loss on one step's ghosts: A and c get exactly dq^T i_t and sum dq of that step (stateless, per step).
    # In variant A earlier ghosts also shape i_t, so the exact check there is at t = 0.
    for t in ([0] if feed else [0, 3]):
        cell.zero_grad()
        out, _ = cell.scan(x, h0)
        out[:, t, m:].pow(2).sum().backward()
        i_t, g_t = out[:, t, :m].detach(), out[:, t, m:].detach()
        dq = 2 * g_t * (1 - g_t.pow(2))
        torch.testing.assert_close(cell.ghost_weight.grad, dq.t() @ i_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cell.ghost_bias.grad, dq.sum(0), rtol=1e-5, atol=1e-6)
        assert cell.weight_hh_n.grad.abs().sum() > 0 and cell.weight_ih.grad.abs().sum() > 0
    # Loss on the last intrinsic state: in variant A it flows back through earlier ghosts (A and the
    # recurrent columns that read ghost features get gradient); in variant B no ghost ever reaches it.
    cell.zero_grad()
    out, _ = cell.scan(x, h0)
    out[:, -1, :m].sum().backward()
    ghost_grad = 0.0 if cell.ghost_weight.grad is None else cell.ghost_weight.grad.abs().sum().item()
    assert (ghost_grad > 0) == feed
    if feed:
        assert cell.weight_hh_n.grad[:, m:].abs().sum() > 0
        assert (cell.weight_hh_rz.grad[:, m:].abs().sum() > 0) == (gate == "full")


# ---- 4.6.5 streaming equivalence -------------------------------------------------------------------------

@pytest.mark.parametrize("feed, gate", SWITCHES)
def test_step_by_step_and_chunks_equal_whole_sequence(feed, gate):
    rnn = GhostGRU(6, 14, 2, ratio=3, feed_ghost_back=feed, gate_input=gate, ghost_act="sigmoid", impl="torch")
    x = torch.randn(3, 11, 6)
    h0 = 0.3 * torch.randn(2, 3, rnn.state_size)
    full, full_state = rnn(x, h0)
    state, steps = h0, []
    for t in range(x.shape[1]):
        y, state = rnn.step(x[:, t], state)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, full_state, rtol=0, atol=1e-6)
    first, mid = rnn(x[:, :4], h0)
    second, end = rnn(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(end, full_state, rtol=0, atol=1e-6)


def test_causal_no_look_ahead():
    rnn = GhostGRU(4, 10, 2, ratio=2, impl="torch")
    x = torch.randn(2, 8, 4)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 3, 4)
    a, _ = rnn(x)
    b, _ = rnn(y)
    assert torch.equal(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_keep_mask_resets_state():
    rnn = GhostGRU(4, 10, 2, ratio=2, impl="torch")
    x = torch.randn(2, 8, 4)
    keep = torch.ones(2, 8)
    keep[0, 3] = 0
    out, _ = rnn(x, keep=keep)
    fresh, _ = rnn(x[:1, 3:])  # the same row restarted from a zero state at step 3
    torch.testing.assert_close(out[:1, 3:], fresh, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], rnn(x[1:])[0], rtol=0, atol=1e-6)


def test_bad_shapes_are_named():
    cell = GhostGRUCell(4, 10)
    with pytest.raises(ValueError, match="x: expected"):
        cell.scan(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="state: expected"):
        cell.scan(torch.randn(2, 3, 4), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="gate_input"):
        GhostGRUCell(4, 10, feed_ghost_back=False, gate_input="full")
    with pytest.raises(ValueError, match="ghost_act"):
        GhostGRUCell(4, 10, ghost_act="gelu")


# ---- 4.6.6 the redundancy diagnostic ---------------------------------------------------------------------

def test_redundancy_diagnostic_against_explicit_loop():
    torch.manual_seed(1)
    base = torch.randn(50, 8, 5)
    # dims 5..7 are (near-)copies of dims 0..2, one of them negated: 3 redundant pairs of 28.
    hidden = torch.cat([base, base[..., :1] * 2.0, -base[..., 1:2], base[..., 2:3] + 0.01 * torch.randn(50, 8, 1)],
                       dim=-1)
    flat = hidden.reshape(-1, 8)
    cos = dimension_cosine_similarity(hidden)
    pairs = 0
    for i in range(8):
        for j in range(8):
            ref = F.cosine_similarity(flat[:, i], flat[:, j], dim=0)
            assert abs(cos[i, j].item() - ref.item()) < 1e-5
            pairs += int(i < j and abs(ref.item()) > 0.9)
    assert pairs == 3
    assert redundancy_fraction(hidden, 0.9) == pytest.approx(3 / 28)
    assert redundancy_fraction(torch.randn(4000, 16), 0.9) == 0.0


# ---- the language model ----------------------------------------------------------------------------------

def test_lm_loss_matches_cross_entropy_on_logits():
    config = tiny_lm_config()
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (3, 10))
    labels = torch.randint(0, config.vocab_size, (3, 10))
    labels[0, :4] = -100
    out = model(ids, labels=labels, return_logits=True)
    ref = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(3, 10)
    assert out.token_losses.dtype == torch.float32 and out.token_losses.shape == (3, 10)
    torch.testing.assert_close(out.token_losses, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out.token_losses[0, :4] == 0)
    torch.testing.assert_close(out.loss, ref[labels != -100].mean(), rtol=1e-5, atol=1e-6)
    assert out.kv_cache.shape == (2, 3, config.hidden_size)
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.logits.shape == (3, 10, config.padded_vocab_size)


def test_lm_state_carry_and_document_reset():
    config = tiny_lm_config(document_masking=True)
    model = build_model(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 12))
    full = model(ids).logits
    first = model(ids[:, :5])
    second = model(ids[:, 5:], state=first.kv_cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=0, atol=1e-5)
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 7:] = 1
    packed = model(ids, doc_ids=doc_ids).logits
    torch.testing.assert_close(packed[:, 7:], model(ids[:, 7:]).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, :7], full[:, :7], rtol=0, atol=1e-6)
    unmasked = build_model(tiny_lm_config(document_masking=False))
    unmasked.load_state_dict(model.state_dict())
    torch.testing.assert_close(unmasked(ids, doc_ids=doc_ids).logits, full, rtol=0, atol=1e-6)


def test_lm_greedy_generation_equals_full_recompute():
    model = build_model(tiny_lm_config())
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    prompt = torch.randint(0, 97, (2, 4))
    generated = model.generate(prompt, max_new_tokens=5)
    tokens = prompt
    for _ in range(5):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1, :97].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, tokens)


def test_flops_per_token_is_six_times_macs():
    config = tiny_lm_config(ghostrnn=GhostRNNConfig(ratio=2, feed_ghost_back=True, gate_input="intrinsic"))
    model = build_model(config)
    h, m, v = 24, 12, config.padded_vocab_size
    layer_macs = 3 * m * h + 2 * m * m + m * h + (h - m) * m
    assert model.flops_per_token(256) == model.flops_per_token(16) == 6.0 * (2 * layer_macs + h * v)


def test_lm_checkpoint_roundtrip_and_activation_checkpointing(tmp_path):
    config = tiny_lm_config()
    model = build_model(config)
    ids = torch.randint(0, 97, (2, 9))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = build_model(tiny_lm_config(activation_checkpointing=True)).train()
    restored.load_state_dict(torch.load(tmp_path / "model.pt"))
    model.train()
    a = model(ids, labels=ids)
    b = restored(ids, labels=ids)
    assert torch.equal(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lm_learns_a_periodic_sequence():
    config = tiny_lm_config(hidden_size=32, num_layers=1)
    model = build_model(config).train()
    pattern = torch.tensor([3, 17, 5, 42, 8, 61, 11])
    stream = pattern.repeat(4)[:25]
    ids, labels = stream[:-1].repeat(2, 1), stream[1:].repeat(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = None
    for _ in range(40):
        loss = model(ids, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > math.log(97) - 0.5
    assert loss.item() < 0.3


# ---- config --------------------------------------------------------------------------------------------

def test_config_errors_name_the_field():
    base = dict(type="ghostrnn_lm", vocab_size=50, hidden_size=16, num_layers=1, num_heads=4)
    with pytest.raises(ConfigError, match="ghostrnn"):
        from_dict(ModelConfig, dict(base), source="x.yaml")
    with pytest.raises(ConfigError, match=r"ghostrnn\.gate_input.*x\.yaml"):
        from_dict(ModelConfig, dict(base, ghostrnn={"gate_input": "half"}), source="x.yaml")
    with pytest.raises(ConfigError, match=r"ghostrnn\.gate_input.*feed_ghost_back"):
        from_dict(ModelConfig, dict(base, ghostrnn={"feed_ghost_back": False}), source="x.yaml")
    with pytest.raises(ConfigError, match=r"ghostrnn\.ratio"):
        from_dict(ModelConfig, dict(base, ghostrnn={"ratio": 0}), source="x.yaml")
    with pytest.raises(ConfigError, match=r"ghostrnn\.ghost_act"):
        from_dict(ModelConfig, dict(base, ghostrnn={"ghost_act": "gelu"}), source="x.yaml")
    with pytest.raises(ConfigError, match=r"ghostrnn\.ratio.*hidden_size"):
        from_dict(ModelConfig, dict(base, ghostrnn={"ratio": 17}), source="x.yaml")
    for act in GHOST_ACTIVATIONS:  # the config accepts exactly the kernel's activations
        assert from_dict(ModelConfig, dict(base, ghostrnn={"ghost_act": act})).ghostrnn.ghost_act == act


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("ghostrnn-*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_count(path):
    config = load_model_config(path)
    ghost = config.ghostrnn
    model = build_model(config, device="meta")
    h, v = config.hidden_size, config.padded_vocab_size
    m = math.ceil(h / ghost.ratio)
    layer = variant_a_params(h, h, m) if ghost.feed_ghost_back else variant_b_params(h, h, m)
    assert model.num_parameters() == 2 * v * h + config.num_layers * layer
    assert isinstance(model, GhostRNNForCausalLM)
