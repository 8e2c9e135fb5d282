"""PreAlign's loss for one micro-batch of dictionary entries (docs/methods.md §3.3):

  * word vectors: in every representation space, the sum of the word's token vectors (padding and BOS masked
    out). The spaces are the embedding output, every block output (L + 1, `output_hidden_states`) and the
    output-embedding rows of the word's tokens (lm_head.weight), L + 2 in all;
  * L_align: in each space, InfoNCE on L2-normalised word vectors at temperature tau (0.1) over the micro-batch
    gathered from every rank *with gradient*: for anchor i the positives are the other words of its concept
    (a pair gives the standard symmetric InfoNCE; more words give the supervised-contrastive form, normalised
    by the number of positives) and every other gathered word is a negative. Self-similarity is excluded
    (-inf, not 0), and so is another copy of the same token sequence under a different concept (identical
    inputs cannot be pushed apart). Averaged over anchors and over the L + 2 spaces;
  * L_LM: next-token loss on the word sequences (the model also learns to produce dictionary words);
  * total: L_LM + alpha * L_align (prealign.alpha_weights "align", the default: what both released trainers
    compute) or L_align + alpha * L_LM ("lm"); alpha = 0.1.

Distributed: each rank computes the loss of its own anchors against all gathered words, and its share of the
LM term's token sum, both scaled so that the ranks' mean (what DeepSpeed's gradient averaging differentiates) is
the loss of the whole micro-batch across ranks; 1 rank with batch 2B and 2 ranks with B each give the same loss
and gradients. Negatives come from one micro-step across ranks, so keep gradient accumulation at 1 to make the
contrastive batch the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fuxi.common.errors import ConfigError
from fuxi.kernels import IGNORE_INDEX
from fuxi.pretrain.stages.prealign.config import AlphaWeights


def word_vectors(hidden_states: tuple[torch.Tensor, ...], input_ids: torch.Tensor, word_mask: torch.Tensor,
                 output_embedding: torch.Tensor) -> torch.Tensor:
    """[S, R, h] fp32: per representation space (each hidden state, then the output-embedding rows), the sum of
    each row's word-token vectors. input_ids, word_mask: [R, W]."""
    mask = word_mask.to(torch.float32).unsqueeze(-1)
    spaces = [(h.float() * mask).sum(1) for h in hidden_states]
    spaces.append((F.embedding(input_ids, output_embedding).float() * mask).sum(1))
    return torch.stack(spaces)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along `dim` whose backward hands each rank the sum over ranks of the gradient of its slice
    (what torch.distributed.nn.functional.all_gather does, without its all-to-all on gloo)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim, ctx.size = dim, tensor.shape[dim]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(ctx.dim, dist.get_rank() * ctx.size, ctx.size), None


def _gather(tensor: torch.Tensor, with_grad: bool, dim: int) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's `tensor` along dim (equal shapes); -> (gathered, this rank's offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    if with_grad:
        return _GatherWithGrad.apply(tensor, dim), rank * tensor.shape[dim]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim), rank * tensor.shape[dim]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class AlignLoss:
    loss: torch.Tensor  # this rank's share, to backpropagate (ranks' mean = loss of the whole batch)
    per_space: torch.Tensor  # [S] detached loss of the whole batch across ranks, per space
    anchors: torch.Tensor  # number of anchors across ranks
    label_tokens: torch.Tensor | None = None  # the `label_tokens` passed in, summed across ranks

    @property
    def value(self) -> float:
        return float(self.per_space.mean())


def contrastive_alignment_loss(vectors: torch.Tensor, concept_ids: torch.Tensor, word_ids: torch.Tensor,
                               temperature: float, label_tokens: torch.Tensor | None = None) -> AlignLoss:
    """InfoNCE over words gathered from every rank, in each space. vectors [S, N, h] (this rank's N words),
    concept_ids / word_ids [N] (-1: empty slot). See the module docstring for positives and exclusions.
    `label_tokens`, this rank's count of next-token labels, is summed across ranks in the same all-reduce as the
    anchor count: one collective per micro-batch for both losses (see global_token_mean)."""
    z_local = F.normalize(vectors.float(), dim=-1)
    z_all, offset = _gather(z_local, with_grad=True, dim=1)
    ids_all, _ = _gather(torch.stack([concept_ids, word_ids]), with_grad=False, dim=1)
    concept_all, word_all = ids_all[0], ids_all[1]
    n_local, n_all = z_local.shape[1], z_all.shape[1]
    valid_all = concept_all >= 0
    rows = torch.arange(n_local, device=vectors.device)
    is_self = torch.zeros(n_local, n_all, dtype=torch.bool, device=vectors.device)
    is_self[rows, rows + offset] = True
    positive = (concept_ids[:, None] == concept_all[None, :]) & valid_all[None, :] & ~is_self
    same_word = (word_ids[:, None] == word_all[None, :]) & ~positive
    anchor = (concept_ids >= 0) & positive.any(1)
    allowed = valid_all[None, :] & ~is_self & ~same_word
    allowed |= ~anchor[:, None]  # rows that are not anchors: keep finite logits (their loss is masked out)
    logits = torch.einsum("snh,smh->snm", z_local, z_all) / temperature
    log_prob = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1).clamp(min=1)  # [S, n_local]
    local_sum = (per_anchor * anchor).sum(-1)  # [S]
    spaces = local_sum.shape[0]
    counts = [anchor.sum()] + ([label_tokens] if label_tokens is not None else [])
    totals = torch.cat([local_sum.detach().double(), torch.stack(counts).double()])
    if _world_size() > 1:
        dist.all_reduce(totals)  # no host sync: the scale stays on the device
    anchors = totals[spaces].clamp(min=1)
    scale = (_world_size() / anchors).float()
    return AlignLoss((local_sum * scale).mean(), (totals[:spaces] / anchors).float(), totals[spaces],
                     totals[spaces + 1] if label_tokens is not None else None)


def global_token_mean(token_losses: torch.Tensor, label_tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of the next-token loss of the whole batch across ranks: its token-loss sum times
    world / `label_tokens` (the label tokens on all ranks), so the ranks' mean, which DeepSpeed's gradient
    averaging differentiates, is the token mean of the global batch. Words differ in length, so a per-rank mean
    would weight the ranks' tokens unequally and 2 ranks would not train like 1 process."""
    return token_losses.sum() * (_world_size() / label_tokens.clamp(min=1)).float()


@dataclass
class PreAlignOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor  # this rank's share (see global_token_mean), detached
    align: AlignLoss
    token_losses: torch.Tensor  # [B, K * W]


def prealign_loss(model, batch: dict[str, torch.Tensor], output_embedding: torch.Tensor, words_per_entry: int,
                  temperature: float, alpha: float, alpha_weights: AlphaWeights = "align") -> PreAlignOutput:
    """The stage loss for one micro-batch (module docstring). `model` is the engine or the bare module."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["word_mask"]
    rows = ids.shape[0] * words_per_entry
    ids, labels, mask = (t.reshape(rows, -1) for t in (ids, labels, mask))
    out = model(ids, labels=labels, output_hidden_states=True)
    if out.hidden_states is None:
        raise ConfigError("model.type", "the prealign_init stage needs a model with output_hidden_states")
    vectors = word_vectors(out.hidden_states, ids, mask, output_embedding)
    align = contrastive_alignment_loss(vectors, batch["concept_ids"].reshape(-1), batch["word_ids"].reshape(-1),
                                       temperature, label_tokens=(labels != IGNORE_INDEX).sum())
    lm = global_token_mean(out.token_losses, align.label_tokens)
    if alpha_weights == "align":
        loss = lm + alpha * align.loss
    else:
        loss = align.loss + alpha * lm
    return PreAlignOutput(loss, lm.detach(), align, out.token_losses.reshape(batch["input_ids"].shape))

