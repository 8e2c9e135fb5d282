"""Fused linear + cross-entropy, chunked over the vocabulary: the Triton softmax steps (interpreter on CPU) and the
chunked torch fallback against the eager reference (which builds the full logits), float64 gradcheck, and a
check that no [tokens, vocab] tensor is ever created."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fuxi import kernels
from fuxi.kernels.cross_entropy import default_vocab_chunk, linear_cross_entropy_torch
from fuxi.kernels.testing import FORWARD_FACTOR, GRADIENT_FACTOR, assert_within_reference_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["triton", "torch"]


def _problem(tokens, hidden, vocab, n_ignored=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) / math.sqrt(hidden)).to(DEVICE).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g)).to(DEVICE).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(DEVICE)
    labels[torch.randperm(tokens, generator=g)[:n_ignored].to(DEVICE)] = kernels.IGNORE_INDEX
    return h, w, labels


def _losses_and_grads(fn, h, w, grad_losses):
    h.grad = w.grad = None
    losses = fn()
    losses.backward(grad_losses)
    return losses.detach(), h.grad.clone(), w.grad.clone()


# rows 1, 7, 33; hidden 96 and 1000; vocab 1000 in chunks of 256 (not a multiple: a 232-column tail chunk).
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (7, 1000), (33, 96)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_matches_eager_reference(impl, tokens, hidden, z_loss):
    h, w, labels = _problem(tokens, hidden, 1000, n_ignored=tokens // 4)
    # Per-token output gradients that differ (per-language weights): exercises the exact backward.
    grad_losses = torch.rand(tokens, device=DEVICE)
    got = _losses_and_grads(lambda: kernels.linear_cross_entropy(h, w, labels, z_loss=z_loss, impl=impl,
                                                                 vocab_chunk=256), h, w, grad_losses)
    want = _losses_and_grads(lambda: linear_cross_entropy_torch(h, w, labels, z_loss=z_loss), h, w, grad_losses)
    assert got[0].dtype == torch.float32 and got[0].shape == (tokens,)
    ignored = labels == kernels.IGNORE_INDEX
    assert torch.all(got[0][ignored] == 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_against_torch_cross_entropy_mean(impl):
    """Independent reference: F.cross_entropy(mean) on explicit logits, with the trainer's mean reduction."""
    h, w, labels = _problem(33, 96, 1000, n_ignored=5, seed=1)
    losses = kernels.linear_cross_entropy(h, w, labels, impl=impl, vocab_chunk=300)
    loss = losses.sum() / (labels != kernels.IGNORE_INDEX).sum()
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=kernels.IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_formula(impl):
    h, w, labels = _problem(7, 96, 1000, seed=2)
    z = 0.1
    got = kernels.linear_cross_entropy(h, w, labels, z_loss=z, impl=impl, vocab_chunk=128)
    logits = (h @ w.t()).double()
    lse = torch.logsumexp(logits, -1)
    want = lse - logits.gather(1, labels[:, None])[:, 0] + z * lse ** 2
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_losses_and_grads(impl):
    h, w, labels = _problem(7, 96, 1000, n_ignored=7)
    losses = kernels.linear_cross_entropy(h, w, labels, impl=impl, vocab_chunk=256)
    losses.sum().backward()
    assert torch.all(losses == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_gradcheck(impl):
    h, w, _ = _problem(5, 8, 37)
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    labels = torch.tensor([1, kernels.IGNORE_INDEX, 36, 0, 20], device=DEVICE)
    fn = lambda a, b: kernels.linear_cross_entropy(a, b, labels, z_loss=0.01, impl=impl, vocab_chunk=16)  # noqa
    assert torch.autograd.gradcheck(fn, (h64, w64), fast_mode=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_only_for_hidden_or_only_for_weight(impl):
    h, w, labels = _problem(7, 96, 1000)
    want = _losses_and_grads(lambda: linear_cross_entropy_torch(h, w, labels), h, w, torch.ones(7, device=DEVICE))
    h.grad = None
    frozen_w = w.detach()
    kernels.linear_cross_entropy(h, frozen_w, labels, impl=impl, vocab_chunk=256).sum().backward()
    torch.testing.assert_close(h.grad, want[1], atol=2e-5, rtol=1e-5)
    w.grad = None
    kernels.linear_cross_entropy(h.detach(), w, labels, impl=impl, vocab_chunk=256).sum().backward()
    torch.testing.assert_close(w.grad, want[2], atol=2e-5, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_full_logits_are_never_materialised(impl, monkeypatch):
    tokens, hidden, vocab, chunk = 64, 16, 3000, 512
    h, w, labels = _problem(tokens, hidden, vocab)
    if impl == "triton" and not torch.cuda.is_available():
        # The CPU interpreter stages kernel arguments through its own host copies; those are not the
        # function's allocations (a GPU launch makes none), so hide the launches from the probe.
        import fuxi.kernels.cross_entropy as ce

        def unobserved(step):
            def run(*args):
                with _disable_current_modes():
                    step(*args)
            return run

        monkeypatch.setattr(ce, "_block_stats_triton", unobserved(ce._block_stats_triton))
        monkeypatch.setattr(ce, "_block_grad_triton", unobserved(ce._block_grad_triton))
    with _LargestTensor() as probe:
        kernels.linear_cross_entropy(h, w, labels, impl=impl, vocab_chunk=chunk).sum().backward()
    # The biggest things allowed: the weight gradient (vocab x hidden = 48K) and a logits chunk (64 x 512 = 32K);
    # the eager logits would be 64 x 3000 = 192K.
    assert probe.largest <= max(vocab * hidden, tokens * chunk)
    with _LargestTensor() as eager:
        linear_cross_entropy_torch(h, w, labels).sum().backward()
    assert eager.largest >= tokens * vocab  # the probe does see full logits when they exist


def test_autocast_bf16_matches_eager_autocast():
    h, w, labels = _problem(33, 96, 1000)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = kernels.linear_cross_entropy(h, w, labels, impl="torch", vocab_chunk=256)
        want = linear_cross_entropy_torch(h, w, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_torch_chunked_bf16_within_flash_rule():
    """bf16 CPU path (no interpreter involved): error vs an fp32 reference at most 2x (losses) / 3x (gradients)
    the error of the eager bf16 loss."""
    h, w, labels = _problem(33, 96, 1000, n_ignored=4, seed=3)
    g = torch.rand(33, device=DEVICE)
    runs = {}
    for name, dtype, fn in (("ref", torch.float32, linear_cross_entropy_torch),
                            ("eager", torch.bfloat16, linear_cross_entropy_torch),
                            ("chunked", torch.bfloat16, lambda a, b, c: kernels.linear_cross_entropy(
                                a, b, c, impl="torch", vocab_chunk=256))):
        a, b = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        losses = fn(a, b, labels)
        losses.backward(g)
        runs[name] = (losses.detach(), a.grad, b.grad)
    for i, factor in enumerate((FORWARD_FACTOR, GRADIENT_FACTOR, GRADIENT_FACTOR)):
        assert_within_reference_error(f"output {i}", runs["chunked"][i], runs["eager"][i], runs["ref"][i], factor)


def test_default_vocab_chunk():
    assert default_vocab_chunk(8192, 250_680, torch.device("cuda")) == 8192
    assert default_vocab_chunk(2048, 250_680, torch.device("cpu")) == 4096
    assert default_vocab_chunk(33, 1000, torch.device("cpu")) == 1000  # small vocab: one chunk
    h, w, labels = _problem(33, 96, 1000)
    torch.testing.assert_close(kernels.linear_cross_entropy(h, w, labels, impl="torch"),
                               linear_cross_entropy_torch(h, w, labels), atol=2e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    h, w, labels = _problem(7, 96, 1000)
    bad = labels.clone()
    bad[3] = 1000
    with pytest.raises(ValueError, match="label 1000 is outside the vocabulary"):
        kernels.linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="labels must be \\[7\\]"):
        kernels.linear_cross_entropy(h, w, labels[:5])
    with pytest.raises(ValueError, match="last dimension 96, expected 95"):
        kernels.linear_cross_entropy(h, w[:, :95], labels)
    with pytest.raises(ValueError, match="integer token ids"):
        kernels.linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        kernels.linear_cross_entropy(h, w, labels, z_loss=-1.0)
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        kernels.linear_cross_entropy(h, w, labels, impl="cuda")


def _bf16_backward(h, w, labels):
    a, b = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    kernels.linear_cross_entropy(a, b, labels, impl="torch", vocab_chunk=256).sum().backward()
    return a.grad


def test_backward_reports_how_grad_hidden_was_accumulated(monkeypatch):
    """The path that ran is observable (cross_entropy.last_path), a fallback warns once, and a failing fp32-out
    GEMM (torch's addmm.dtype rejects an fp32 accumulator on CUDA) is reported as a fallback with its reason."""
    from fuxi.kernels import cross_entropy as ce

    monkeypatch.setattr(ce, "_warned", set())
    h, w, labels = _problem(33, 96, 1000, seed=5)
    kernels.linear_cross_entropy(h, w, labels, impl="torch", vocab_chunk=256).sum().backward()
    assert ce.last_path() == ce.SAME_DTYPE  # fp32 operands: nothing is rounded
    if DEVICE == "cpu":
        with pytest.warns(RuntimeWarning, match="rounded to the compute dtype"):
            _bf16_backward(h, w, labels)
        assert ce.last_path() == "bf16 fallback (torch's out_dtype mm has no cpu kernel)"

    # A device with the out_dtype GEMM (simulated: fp32 products of the bf16 operands) takes it ...
    monkeypatch.setattr(ce, "_fp32_out_mm_reason", lambda a: None)
    monkeypatch.setattr(ce, "_fp32_out_mm", lambda a, b, out=None: torch.mm(a.float(), b.float(), out=out))
    exact = _bf16_backward(h, w, labels)
    assert ce.last_path() == "fp32-out mm"

    # ... and one whose GEMM raises falls back, says why, and warns once for that reason.
    def rejected(a, b, out=None):
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    monkeypatch.setattr(ce, "_fp32_out_mm", rejected)
    with pytest.warns(RuntimeWarning, match="same dtype"):
        rounded = _bf16_backward(h, w, labels)
    assert ce.last_path() == "bf16 fallback (RuntimeError: self and mat2 must have the same dtype, but got Float " \
                             "and BFloat16)"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bf16_backward(h, w, labels)  # the same reason again: no second warning
    # fp32 products summed in fp32 are closer to the fp32 gradient than bf16-rounded ones.
    h.grad = None
    kernels.linear_cross_entropy(h, w, labels, impl="torch", vocab_chunk=256).sum().backward()
    assert (exact.float() - h.grad).abs().max() <= (rounded.float() - h.grad).abs().max()
