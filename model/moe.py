"""The MoE-LPR feed-forward layer (docs/methods.md §2.2-2.4): router, expert dispatch, balance and LPR losses.

An upcycled FFN becomes N experts: expert 0 is the original FFN, experts 1..N-1 start as exact copies. A
bias-free router Linear(h, N) (Xavier-normal) scores each token; the softmax runs in fp32 and the top-K
probabilities, renormalised to sum to 1, weight the chosen experts' outputs. With identical experts and K >= 2
the layer therefore equals the dense FFN for any router, which is what makes upcycling function-preserving.

Dispatch has no Python loop over tokens: the T*K (token, choice) pairs are sorted by expert
(`plan_dispatch`), tokens are permuted into that order (kernels/moe_permute.py), each expert runs on its
contiguous slice (a loop over *experts*, or one grouped GEMM), and the weighted sum scatters results back.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fuxi import kernels
from fuxi.common.typed_config import require_choice
from fuxi.kernels.moe_permute import combine_tokens, permute_tokens
from fuxi.model.config import ModelConfig, MoELossForm
from fuxi.model.fuxitranyu import dense_mlp


class RouterOutput(NamedTuple):
    """One MoE layer's routing for T flattened tokens (a tuple, so activation checkpointing passes it through)."""

    logits: torch.Tensor      # [T, N] fp32 router logits
    probs: torch.Tensor       # [T, N] fp32 softmax, G(x) in the paper
    expert_ids: torch.Tensor  # [T, K] chosen experts, by decreasing probability
    weights: torch.Tensor     # [T, K] fp32 combine weights (renormalised top-K, or raw p_max for K=1 compat)


class DispatchPlan(NamedTuple):
    positions: torch.Tensor  # [T, K] row of the expert-sorted buffer holding token t's k-th choice
    counts: torch.Tensor     # [N] rows per expert; expert e owns rows offsets[e-1]:offsets[e]


def route(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> RouterOutput:
    """Softmax in fp32, top-K on the probabilities; renormalise the K weights to sum to 1 unless told not to
    (the released code leaves K=1 unrenormalised, so its output is p_max * E(x))."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    top_p, expert_ids = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if renormalize else top_p
    return RouterOutput(logits, probs, expert_ids, weights)


def plan_dispatch(expert_ids: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Stable sort of the flattened choices by expert: ties keep token order, so the plan is deterministic."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    positions = torch.empty_like(order)
    positions[order] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return DispatchPlan(positions.view(expert_ids.shape), counts)


# ---- expert compute on contiguous slices ------------------------------------------------------------------

def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


class _GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W_e^T + b_e for all experts in one grouped GEMM.

    The per-expert weights stay separate Parameters (HF names, per-expert freezing); they are stacked inside
    forward and again in backward, so no stacked copy is kept alive between the two.
    """

    @staticmethod
    def forward(ctx, x, offsets, counts, num_experts, *params):
        weights, biases = params[:num_experts], params[num_experts:]
        y = F.grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offsets)
        if biases:
            y = y + torch.repeat_interleave(torch.stack(biases), counts, dim=0, output_size=x.shape[0])
        ctx.num_experts, ctx.has_bias = num_experts, bool(biases)
        ctx.save_for_backward(x, offsets, counts, *weights)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, counts, *weights = ctx.saved_tensors
        n = ctx.num_experts
        dy = dy.contiguous()
        needs = ctx.needs_input_grad
        dx = F.grouped_mm(dy, torch.stack(weights), offs=offsets) if needs[0] else None
        dw = [None] * n
        if any(needs[4:4 + n]):
            stacked = F.grouped_mm(dy.t(), x, offs=offsets)  # [E, out, in]; empty groups give zeros
            dw = [stacked[e] if needs[4 + e] else None for e in range(n)]
        db = []
        if ctx.has_bias:
            sums = segment_bias_grads(dy, counts)
            db = [sums[e] if needs[4 + n + e] else None for e in range(n)]
        return (dx, None, None, None, *dw, *db)


def segment_bias_grads(dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert bias gradients [E, out]: the sum of each expert's `counts` consecutive rows of dy.

    Accumulated in fp32 and rounded once: torch.segment_reduce sums in its input dtype (bf16 stalls at 512 when
    adding values near 1, ~2,700 rows per expert at the bench's shapes)."""
    return torch.segment_reduce(dy.float(), "sum", lengths=counts, axis=0).to(dy.dtype)


def grouped_linear(x: torch.Tensor, counts: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """Rows of `x` grouped by expert (`counts` rows each) through the matching Linear, one grouped GEMM."""
    offsets = counts.cumsum(0).to(torch.int32)
    params = [lin.weight for lin in linears]
    if linears[0].bias is not None:
        params += [lin.bias for lin in linears]
    return _GroupedLinear.apply(x, offsets, counts, len(linears), *params)


class MoEFeedForward(nn.Module):
    """Router + N experts (`experts.{j}.up_proj/down_proj`, expert 0 the original FFN). Returns (out, routing)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.renormalize = not moe.top1_code_compat
        self.impl, self.expert_compute = config.kernels, moe.expert_compute
        self.router = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(dense_mlp(config) for _ in range(moe.num_experts))
        nn.init.xavier_normal_(self.router.weight)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.expert_compute == "loop":
            return False
        # ZeRO-3 gathers a module's parameters in its forward hooks; the grouped path reads the experts'
        # weights without calling the expert modules, so it cannot see partitioned parameters.
        partitioned = hasattr(self.experts[0].up_proj.weight, "ds_id")
        gated = hasattr(self.experts[0], "gate_proj")  # the grouped path computes the GELU MLP only
        if self.expert_compute == "grouped_mm":
            if gated:
                raise RuntimeError("moe.expert_compute: grouped_mm computes the GELU experts only; gated "
                                   "(swiglu) experts use loop or auto")
            if not grouped_mm_available():
                raise RuntimeError("moe.expert_compute: grouped_mm needs torch.nn.functional.grouped_mm "
                                   f"(torch >= 2.9); this is torch {torch.__version__}; use loop")
            if partitioned:
                raise RuntimeError("moe.expert_compute: grouped_mm cannot run on ZeRO-3 partitioned experts; "
                                   "use loop or auto")
            return True
        # auto: torch's grouped GEMM targets bf16 on CUDA; elsewhere the expert loop is as fast.
        aligned = all(lin.weight.shape[1] % 8 == 0 for lin in (self.experts[0].up_proj, self.experts[0].down_proj))
        return (not gated and grouped_mm_available() and x.is_cuda and x.dtype == torch.bfloat16 and aligned
                and not partitioned)

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert e on rows offsets[e-1]:offsets[e] of the sorted buffer. Every expert runs, even on zero
        rows, so all parameters take part in every backward (ZeRO/DDP gradient hooks expect that)."""
        if self._use_grouped_mm(x_sorted):
            up = grouped_linear(x_sorted, counts, [e.up_proj for e in self.experts])
            hidden = kernels.bias_gelu(up, None, impl=self.impl)
            return grouped_linear(hidden, counts, [e.down_proj for e in self.experts])
        chunks = x_sorted.split(counts.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = route(self.router(tokens), self.top_k, self.renormalize)
        plan = plan_dispatch(routing.expert_ids, self.num_experts)
        x_sorted = permute_tokens(tokens, plan.positions, impl=self.impl)
        y_sorted = self.run_experts(x_sorted, plan.counts)
        out = combine_tokens(y_sorted, plan.positions, routing.weights, impl=self.impl)
        return out.view(shape), routing


# ---- auxiliary losses -------------------------------------------------------------------------------------

def _flat_mask(mask: torch.Tensor | None, num_tokens: int, name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.numel() != num_tokens:
        raise ValueError(f"{name}: has {mask.numel()} entries (shape {tuple(mask.shape)}), expected one per token "
                         f"({num_tokens})")
    return mask.reshape(-1).bool()


def _check_form(loss: str, form: str) -> None:
    require_choice(f"{loss} form", form, MoELossForm)


def balance_loss(routing: Sequence[RouterOutput], num_experts: int, top_k: int,
                 token_mask: torch.Tensor | None = None, form: MoELossForm = "code") -> torch.Tensor:
    """Load-balancing loss, computed per layer over the unmasked tokens, then averaged over layers.

    code  (released MoE-LPR / HF Mixtral): N * sum_e (sum_k frac_{k,e}) * P_e, which is K at uniform routing.
    paper (Eq. 8): sum_i f_i P_i with f_i = N / (K T) * #selections of i, which is 1 at uniform routing.
    P_e is the mean router probability of expert e. `token_mask` [B, T] marks real (non-padding) tokens.
    """
    _check_form("balance_loss", form)
    per_layer = []
    for layer in routing:
        mask = _flat_mask(token_mask, layer.probs.shape[0], "loss_mask")
        selected = F.one_hot(layer.expert_ids, num_experts).sum(1).float()  # [T, N], 0/1
        probs = layer.probs
        if mask is None:
            prob_mean, select_frac = probs.mean(0), selected.mean(0)
        else:
            m = mask.float()[:, None]
            count = m.sum().clamp(min=1.0)
            prob_mean, select_frac = (probs * m).sum(0) / count, (selected * m).sum(0) / count
        loss = num_experts * (select_frac * prob_mean).sum()
        per_layer.append(loss if form == "code" else loss / top_k)
    if not per_layer:
        return torch.zeros(())
    return torch.stack(per_layer).mean()


def lpr_loss(routing: Sequence[RouterOutput], original_mask: torch.Tensor | None,
             form: MoELossForm = "code") -> torch.Tensor:
    """Language-Priors Routing: pull original-language tokens to expert 0, at every MoE layer.

    code  (released, the default; gamma = 0.1 was tuned with it): cross-entropy with target 0 applied to the
          *probabilities* (a double softmax), -log(e^{p_0} / sum_j e^{p_j}); its minimum is log(1 + (N-1)/e).
    paper (Eq. 10): -log G_0(t); the same pull with a router gradient N times stronger at uniform routing and
          more on trained routing (6x at N = 4, docs/moe_lpr.md), so it needs a smaller gamma for the same pull.
    Both are averaged over the original-language tokens and the layers. No original-language token in the batch
    gives 0 (not the NaN of an empty mean); other tokens never count.
    """
    _check_form("lpr_loss", form)
    if not routing:
        return torch.zeros(())
    if original_mask is None:
        return routing[0].logits.sum() * 0.0
    per_layer = []
    for layer in routing:
        mask = _flat_mask(original_mask, layer.logits.shape[0], "original_mask")
        if form == "paper":
            token_loss = -torch.log_softmax(layer.logits, dim=-1)[:, 0]
        else:
            token_loss = torch.logsumexp(layer.probs, dim=-1) - layer.probs[:, 0]
        count = mask.sum().clamp(min=1)
        per_layer.append(token_loss.masked_fill(~mask, 0.0).sum() / count)
    return torch.stack(per_layer).mean()


def original_language_mask(lang_ids: torch.Tensor, languages: Sequence[str],
                           original_languages: Sequence[str]) -> torch.Tensor:
    """[B, T] bool: which tokens come from an original language. `languages[i]` names lang id i (the stream's
    language table); ids outside the table (e.g. -1 for padding) are not original."""
    unknown = sorted(set(original_languages) - set(languages))
    if unknown:
        raise ValueError(f"original_languages: {unknown} not in the stream's language table {list(languages)}")
    wanted = torch.tensor([i for i, lang in enumerate(languages) if lang in set(original_languages)],
                          dtype=lang_ids.dtype, device=lang_ids.device)
    return torch.isin(lang_ids, wanted)
