"""The MoE-LPR layer and its losses (docs/methods.md §2.9 items 1, 5, 6, 7, 9) against per-token loops and the
paper's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import load_config
from fuxi.model.config import ModelConfig, MoEConfig
from fuxi.model.fuxitranyu import MLP
from fuxi.model.moe import (MoEFeedForward, RouterOutput, balance_loss, grouped_linear, grouped_mm_available,
                            lpr_loss, original_language_mask, route, segment_bias_grads)

H, FFN = 32, 64


def layer_config(**moe) -> ModelConfig:
    fields = dict(num_experts=4, top_k=2)
    fields.update(moe)
    return ModelConfig(type="fuxitranyu_moe", vocab_size=64, hidden_size=H, num_layers=2, num_heads=4,
                       ffn_hidden_size=FFN, kernels="torch", moe=MoEConfig(**fields))


def moe_layer(distinct: bool = True, seed: int = 0, **moe) -> MoEFeedForward:
    """Random, biased experts (distinct, or all copies of expert 0 as after upcycling)."""
    torch.manual_seed(seed)
    layer = MoEFeedForward(layer_config(**moe))
    with torch.no_grad():
        for expert in layer.experts:
            for p in expert.parameters():
                p.normal_(0.0, 0.2)
        if not distinct:
            for expert in layer.experts[1:]:
                expert.load_state_dict(layer.experts[0].state_dict())
        layer.router.weight.mul_(8.0)  # confident, varied routing
    return layer


def per_token_reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """sum_k w_k E_k(x_t), one token at a time (the definition, no sorting)."""
    rows = []
    for token in x.reshape(-1, H):
        probs = torch.softmax(layer.router(token).double(), -1)
        top_p, top_i = probs.topk(layer.top_k)
        weights = top_p / top_p.sum() if layer.renormalize else top_p
        rows.append(sum(w.float() * layer.experts[int(i)](token[None])[0] for w, i in zip(weights, top_i)))
    return torch.stack(rows).view(x.shape)


# ---- routing and dispatch ---------------------------------------------------------------------------------

def test_router_is_bias_free_xavier_normal():
    layer = MoEFeedForward(ModelConfig(type="fuxitranyu_moe", vocab_size=64, hidden_size=1024, num_layers=1,
                                       num_heads=4, ffn_hidden_size=16, kernels="torch",
                                       moe=MoEConfig(num_experts=8, top_k=2)))
    assert layer.router.bias is None and layer.router.weight.shape == (8, 1024)
    w = layer.router.weight.detach()
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (1024 + 8)), rel=0.05)  # Glorot: 2 / (fan_in + fan_out)
    assert abs(w.mean().item()) < 0.005


def test_softmax_in_fp32_and_topk_on_probabilities():
    logits = torch.randn(10, 6, dtype=torch.bfloat16)
    out = route(logits, top_k=2)
    assert out.probs.dtype == torch.float32 and out.weights.dtype == torch.float32
    probs = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(out.probs, probs)
    expected_ids = probs.argsort(-1, descending=True)[:, :2]
    assert torch.equal(out.expert_ids, expected_ids)
    top = probs.gather(1, expected_ids)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(route(logits, 1, renormalize=False).weights, probs.max(-1, keepdim=True).values)


@pytest.mark.parametrize("compute", ["loop", "grouped_mm"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_matches_per_token_reference_forward_and_backward(compute, top_k):
    layer = moe_layer(top_k=top_k, expert_compute=compute)
    x = torch.randn(3, 7, H, requires_grad=True)
    out, routing = layer(x)
    ref = per_token_reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad(out, params, grad, allow_unused=True)
    want = torch.autograd.grad(ref, params, grad, allow_unused=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w if w is not None
                                   else torch.zeros_like(g), rtol=1e-4, atol=1e-5)
    # Every expert takes part in the graph, even one that got no token.
    assert all(g is not None for g in got)


def test_layer_with_triton_permutation_matches_torch():
    layer = moe_layer()
    x = torch.randn(2, 9, H, requires_grad=True)
    out_ref, _ = layer(x)
    layer.impl = "triton"
    out_tr, _ = layer(x)
    torch.testing.assert_close(out_tr, out_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out_ref)
    got = torch.autograd.grad(out_tr, [x, layer.router.weight], g)
    want = torch.autograd.grad(out_ref, [x, layer.router.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [2, 3, 4])
def test_function_preservation_with_any_router(top_k):
    """Identical experts + renormalised top-K weights (K >= 2) = the dense FFN, whatever the router."""
    layer = moe_layer(distinct=False, top_k=top_k)
    dense = MLP(layer_config())
    dense.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(4, 11, H)
    with torch.no_grad():
        out, _ = layer(x)
        assert (out - dense(x)).abs().max().item() < 1e-6


def test_top1_code_compat_scales_by_p_max_and_is_not_dense():
    layer = moe_layer(distinct=False, top_k=1, top1_code_compat=True)
    dense = MLP(layer_config())
    dense.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(2, 8, H)
    with torch.no_grad():
        out, routing = layer(x)
        p_max = routing.probs.max(-1).values.view(2, 8, 1)
        torch.testing.assert_close(out, p_max * dense(x), rtol=1e-6, atol=1e-6)
        assert (out - dense(x)).abs().max() > 1e-2
        renormalised = moe_layer(distinct=False, top_k=1)  # K=1 renormalised: weight exactly 1
        assert (renormalised(x)[0] - dense(x)).abs().max().item() < 1e-6


# ---- balance loss -----------------------------------------------------------------------------------------

def _routing_from_logits(logits: torch.Tensor, top_k: int) -> RouterOutput:
    return route(logits, top_k)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_at_zero_logits_is_k_code_and_1_paper(top_k):
    routing = [_routing_from_logits(torch.zeros(50, 6), top_k)]
    assert balance_loss(routing, 6, top_k, form="code").item() == pytest.approx(top_k, abs=1e-6)
    assert balance_loss(routing, 6, top_k, form="paper").item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_paper_formula_and_code_is_k_times_paper():
    logits = torch.randn(40, 5) * 2
    routing = [_routing_from_logits(logits, 2)]
    probs = torch.softmax(logits, -1)
    chosen = probs.topk(2, -1).indices
    counts = torch.tensor([(chosen == i).sum().item() for i in range(5)], dtype=torch.float32)
    f = 5 / (2 * 40) * counts                   # f_i = N / (K T) * count_i
    p = probs.mean(0)                            # P_i
    paper = (f * p).sum()
    torch.testing.assert_close(balance_loss(routing, 5, 2, form="paper"), paper)
    torch.testing.assert_close(balance_loss(routing, 5, 2, form="code"), 2 * paper)


def test_balance_loss_ignores_padding_and_averages_layers():
    real = [torch.randn(12, 4) * 3, torch.randn(12, 4)]
    padded = [torch.cat([r, torch.randn(5, 4) * 10]) for r in real]
    mask = torch.cat([torch.ones(12), torch.zeros(5)]).bool().view(1, 17)
    for form in ("code", "paper"):
        alone = balance_loss([_routing_from_logits(r, 2) for r in real], 4, 2, form=form)
        with_pad = balance_loss([_routing_from_logits(r, 2) for r in padded], 4, 2, token_mask=mask, form=form)
        torch.testing.assert_close(with_pad, alone)
        per_layer = [balance_loss([_routing_from_logits(r, 2)], 4, 2, form=form) for r in real]
        torch.testing.assert_close(alone, (per_layer[0] + per_layer[1]) / 2)
        assert not torch.allclose(per_layer[0], per_layer[1])
    unmasked = balance_loss([_routing_from_logits(r, 2) for r in padded], 4, 2)
    assert not torch.allclose(unmasked, balance_loss([_routing_from_logits(r, 2) for r in real], 4, 2))


# ---- LPR loss ---------------------------------------------------------------------------------------------

def test_lpr_depends_only_on_original_tokens_and_matches_formula():
    logits = [torch.randn(10, 4), torch.randn(10, 4)]
    flags = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    routing = [_routing_from_logits(lg, 2) for lg in logits]
    paper = lpr_loss(routing, flags, "paper")
    expected = torch.stack([-torch.log_softmax(lg, -1)[flags, 0].mean() for lg in logits]).mean()
    torch.testing.assert_close(paper, expected)
    code = lpr_loss(routing, flags, "code")
    expected_code = torch.stack([F.cross_entropy(torch.softmax(lg, -1)[flags], torch.zeros(4, dtype=torch.long))
                                 for lg in logits]).mean()
    torch.testing.assert_close(code, expected_code)
    changed = [lg.clone() for lg in logits]
    for lg in changed:
        lg[~flags] = torch.randn(6, 4) * 50
    routing_changed = [_routing_from_logits(lg, 2) for lg in changed]
    for form in ("paper", "code"):
        assert torch.equal(lpr_loss(routing_changed, flags, form), lpr_loss(routing, flags, form))


def test_default_lpr_is_the_released_cross_entropy_over_the_probabilities():
    """The default form is the released lpr_loss_func: softmax of the stacked [L, T, N] router logits, the
    original-language rows of every layer, CrossEntropyLoss with target expert 0 applied to those probabilities."""
    assert MoEConfig().lpr_loss_form == "code"
    logits = [torch.randn(12, 6) * 3 for _ in range(3)]
    flags = torch.rand(12) < 0.5
    flags[0] = True
    probs = torch.softmax(torch.stack(logits), dim=-1)            # [L, T, N]
    rows = probs[flags.expand(3, -1)]                              # the released mask, every layer
    expected = torch.nn.CrossEntropyLoss()(rows, torch.zeros(rows.shape[0], dtype=torch.long))
    torch.testing.assert_close(lpr_loss([_routing_from_logits(lg, 2) for lg in logits], flags), expected)


@pytest.mark.parametrize("num_experts", [4, 6])
def test_paper_form_router_gradient_is_n_times_the_code_form_at_uniform_routing(num_experts):
    """d(-log p_0)/dz = p - e_0; the code form's is (diag p - p p^T)(q - e_0) with q = softmax(p), which at
    p = 1/N is (p - e_0)/N: the paper form pulls N times harder (docs/moe_lpr.md measures the ratio elsewhere)."""
    from fuxi.experiments.moe_lpr import lpr_gradient_ratio

    uniform = lpr_gradient_ratio([torch.zeros(5, num_experts)], top_k=2)
    assert uniform["norm_ratio"] == pytest.approx(num_experts, rel=1e-5)
    assert uniform["median_token_ratio"] == pytest.approx(num_experts, rel=1e-5)
    skewed = lpr_gradient_ratio([torch.randn(200, num_experts) * 2], top_k=2)
    assert skewed["norm_ratio"] > 1.0


def test_lpr_minima_paper_zero_code_log_one_plus():
    n = 6
    confident = [_routing_from_logits(torch.tensor([[60.0] + [0.0] * (n - 1)] * 3), 2)]
    flags = torch.ones(3, dtype=torch.bool)
    assert lpr_loss(confident, flags, "paper").item() < 1e-12
    floor = math.log(1 + (n - 1) / math.e)  # double softmax with p = one-hot(0)
    assert lpr_loss(confident, flags, "code").item() == pytest.approx(floor, rel=1e-6)
    uniform = [_routing_from_logits(torch.zeros(3, n), 2)]
    assert lpr_loss(uniform, flags, "paper").item() == pytest.approx(math.log(n))
    assert lpr_loss(uniform, flags, "code").item() > floor


def test_lpr_without_original_tokens_is_zero_not_nan_and_backward_works():
    layer = moe_layer()
    x = torch.randn(2, 5, H)
    for form in ("paper", "code"):
        _, routing = layer(x)
        loss = lpr_loss([routing], torch.zeros(2, 5, dtype=torch.bool), form)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.count_nonzero(layer.router.weight.grad) == 0
        layer.zero_grad()


def test_lpr_gradient_reaches_only_the_router():
    layer = moe_layer()
    x = torch.randn(2, 6, H, requires_grad=True)
    out, routing = layer(x)
    flags = torch.rand(2, 6) < 0.5
    flags[0, 0] = True
    lpr_loss([routing], flags, "paper").backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for name, p in layer.experts.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


# ---- config -----------------------------------------------------------------------------------------------

def test_balance_and_lpr_are_mutually_exclusive(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text("num_experts: 6\ntop_k: 2\nbalance_loss_coef: 0.01\nlpr_loss_coef: 0.1\n")
    with pytest.raises(ConfigError, match="mutually exclusive") as err:
        load_config(MoEConfig, path)
    assert str(path) in str(err.value)
    assert load_config(MoEConfig, path, ["balance_loss_coef=0"]).lpr_loss_coef == 0.1
    assert load_config(MoEConfig, path, ["lpr_loss_coef=0"]).balance_loss_coef == 0.01


@pytest.mark.parametrize("fields, message", [
    (dict(num_experts=1), "num_experts: must be >= 2"),
    (dict(top_k=7), "top_k: must be in \\[1, num_experts=6\\]"),
    (dict(top1_code_compat=True), "top1_code_compat: only meaningful with top_k: 1"),
    (dict(balance_loss_form="mixtral"), "balance_loss_form: 'mixtral'"),
    (dict(lpr_loss_form="x"), "lpr_loss_form"),
    (dict(layers=[0, 0]), "layers: must be distinct"),
    (dict(original_languages=["en", "en"]), "original_languages"),
    (dict(expert_compute="cuda"), "expert_compute"),
])
def test_bad_moe_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**fields).validate()


def test_model_config_requires_moe_and_layers_in_range():
    base = dict(type="fuxitranyu_moe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64)
    with pytest.raises(ConfigError, match="moe: required"):
        ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match="moe.layers: \\[5\\] out of range"):
        ModelConfig(**base, moe=MoEConfig(layers=[0, 5])).validate()


def test_original_language_mask_from_lang_ids():
    lang_ids = torch.tensor([[0, 0, 2, 1, -1], [3, 2, 2, 0, 1]])
    mask = original_language_mask(lang_ids, ["en", "el", "zh", "tr"], ["en", "zh"])
    assert mask.tolist() == [[True, True, True, False, False], [False, True, True, True, False]]
    with pytest.raises(ValueError, match="\\['xx'\\] not in"):
        original_language_mask(lang_ids, ["en"], ["xx"])


def test_language_flags_survive_a_packed_block_boundary():
    """docs/methods.md §2.9 item 8: a block packed from an old-language doc then a new-language doc, each ending in EOS
    (id 0) and each token carrying its document's language. After the stream's next-token shift and
    `original_language_mask` the flags are 1...1 0...0 at the exact boundary, each EOS with its own doc's flag,
    and LPR counts exactly the flagged positions."""
    from fuxi.data_pipeline.stream import default_transform

    old_doc, new_doc = [11, 12, 13, 0], [21, 22, 23, 24, 0]  # EOS-terminated, as data_pipeline/pack.py emits
    tokens = torch.tensor(old_doc + new_doc)
    lang_ids = torch.tensor([0] * len(old_doc) + [1] * len(new_doc))  # languages: ["en", "el"]
    doc_ids = torch.tensor([0] * len(old_doc) + [1] * len(new_doc))
    sample = default_transform({"tokens": tokens, "lang_ids": lang_ids, "doc_ids": doc_ids})
    mask = original_language_mask(sample["lang_ids"][None], ["en", "el"], ["en"])
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    eos_of_old = sample["input_ids"].tolist().index(0)
    assert eos_of_old == 3 and bool(mask[0, eos_of_old]) and not bool(mask[0, eos_of_old + 1])
    logits = torch.randn(8, 4)
    expected = -torch.log_softmax(logits, -1)[:4, 0].mean()
    torch.testing.assert_close(lpr_loss([route(logits, 2)], mask, "paper"), expected)


def test_expert_compute_choice():
    """auto: the loop on CPU fp32; the grouped path refuses ZeRO-3 partitioned experts (it skips their hooks)."""
    layer = moe_layer(expert_compute="auto")
    x = torch.randn(5, H)
    assert not layer._use_grouped_mm(x)
    layer.expert_compute = "grouped_mm"
    assert layer._use_grouped_mm(x)
    layer.experts[0].up_proj.weight.ds_id = 0  # what DeepSpeed ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        layer._use_grouped_mm(x)


def test_expert_bias_gradients_accumulate_in_fp32_and_round_once():
    """~2,700 bf16 rows per expert (the bench's load): the fp32 sum rounded once to bf16, which a bf16
    accumulation (segment_reduce's own, on CPU and CUDA) misses by far (it stalls where the spacing passes 1)."""
    torch.manual_seed(0)
    counts = torch.tensor([2700, 0, 2650])
    dy = (1 + torch.rand(int(counts.sum()), 8)).to(torch.bfloat16)
    reference = torch.stack([rows.float().sum(0) for rows in dy.split(counts.tolist())]).to(torch.bfloat16)
    assert torch.equal(segment_bias_grads(dy, counts), reference)
    bf16_sums = torch.segment_reduce(dy, "sum", lengths=counts, axis=0)
    assert (bf16_sums.float() - reference.float()).abs().max() > 1000
    if grouped_mm_available():  # the grouped path's backward hands these sums to every expert's bias
        linears = [torch.nn.Linear(16, 8).to(torch.bfloat16) for _ in range(3)]
        x = torch.randn(int(counts.sum()), 16, dtype=torch.bfloat16)
        grouped_linear(x, counts, linears).backward(dy)
        assert all(torch.equal(lin.bias.grad, ref) for lin, ref in zip(linears, reference))
