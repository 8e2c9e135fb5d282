"""The kernels inside the model: a tiny FuxiTranyu with kernels='triton' (interpreter on CPU) against the same
model with the torch references — loss, per-token losses and every parameter gradient, then 50 training steps."""

import pytest
import torch

from fuxi import kernels
from fuxi.model.config import ModelConfig
from fuxi.model.fuxitranyu import FuxiTranyuForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 301  # odd: exercises the masked tail of every vocab tile


def _config(impl: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256,
                       max_seq_len=64, kernels=impl)


def _twin_models():
    torch.manual_seed(0)
    triton_model = FuxiTranyuForCausalLM(_config("triton")).to(DEVICE)
    torch_model = FuxiTranyuForCausalLM(_config("torch")).to(DEVICE)
    torch_model.load_state_dict(triton_model.state_dict())
    return triton_model, torch_model


def _batch(batch: int, seq: int, seed: int):
    """Sequences of a learnable rule: x[t+1] = (x[t] * 7 + row offset) mod VOCAB, with some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    offset = torch.randint(1, 5, (batch, 1), generator=g)
    seqs = [start]
    for _ in range(seq):
        seqs.append((seqs[-1] * 7 + offset) % VOCAB)
    tokens = torch.cat(seqs, dim=1)
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    labels[:, :2] = kernels.IGNORE_INDEX
    return inputs.to(DEVICE), labels.to(DEVICE)


def test_triton_model_uses_every_kernel_and_matches_torch(monkeypatch):
    triton_model, torch_model = _twin_models()
    inputs, labels = _batch(2, 33, seed=1)
    calls = []
    for name in ("rms_norm_triton", "add_rms_norm_triton", "bias_gelu_triton", "apply_rope_triton",
                 "linear_cross_entropy_chunked"):
        original = getattr(kernels, name)

        def recording(*args, _original=original, _name=name, **kw):
            calls.append((_name, kw.get("use_triton", True)))
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, name, recording)
    out_t = triton_model(inputs, labels=labels, z_loss=1e-4)
    out_t.loss.backward()
    monkeypatch.undo()
    # Per layer: a norm, a fused residual-add + norm, a GELU and a RoPE; the final norm; one loss.
    assert sorted(set(calls)) == [("add_rms_norm_triton", True), ("apply_rope_triton", True),
                                  ("bias_gelu_triton", True), ("linear_cross_entropy_chunked", True),
                                  ("rms_norm_triton", True)]
    assert len(calls) == 2 * 4 + 1 + 1
    out_r = torch_model(inputs, labels=labels, z_loss=1e-4)
    out_r.loss.backward()
    torch.testing.assert_close(out_t.loss, out_r.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_t.token_losses, out_r.token_losses, atol=1e-5, rtol=1e-5)
    grads_r = dict(torch_model.named_parameters())
    for name, p in triton_model.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_llama_architecture_uses_the_swiglu_kernel_and_matches_torch(monkeypatch):
    """The gated MLP (mlp: swiglu, GQA, no biases) through the fused SwiGLU kernel equals the torch reference."""
    def config(impl):
        return ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           ffn_hidden_size=176, max_seq_len=64, family="llama", mlp="swiglu", attention_bias="none",
                           mlp_bias=False, kernels=impl)

    torch.manual_seed(0)
    triton_model = FuxiTranyuForCausalLM(config("triton")).to(DEVICE)
    torch_model = FuxiTranyuForCausalLM(config("torch")).to(DEVICE)
    torch_model.load_state_dict(triton_model.state_dict())
    calls = []
    original = kernels.swiglu_triton
    monkeypatch.setattr(kernels, "swiglu_triton", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    inputs, labels = _batch(2, 17, seed=3)
    out_t = triton_model(inputs, labels=labels)
    out_t.loss.backward()
    monkeypatch.undo()
    assert len(calls) == 2  # one per layer
    out_r = torch_model(inputs, labels=labels)
    out_r.loss.backward()
    torch.testing.assert_close(out_t.loss, out_r.loss, atol=1e-5, rtol=1e-5)
    grads_r = dict(torch_model.named_parameters())
    for name, p in triton_model.named_parameters():
        torch.testing.assert_close(p.grad, grads_r[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def _train(model, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        inputs, labels = _batch(2, 32, seed=100 + step % 5)
        loss = model(inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_fifty_steps_converge_to_the_same_loss():
    triton_model, torch_model = _twin_models()
    triton_losses = _train(triton_model, 50)
    torch_losses = _train(torch_model, 50)
    assert torch_losses[-1] < 0.5 * torch_losses[0]  # it learns
    assert abs(triton_losses[-1] - torch_losses[-1]) <= 2e-4 * torch_losses[-1]
    assert max(abs(a - b) for a, b in zip(triton_losses, torch_losses)) <= 2e-4 * max(torch_losses)
