"""GhostRNN (Zhou et al., Interspeech 2023; docs/methods.md §4): GhostGRU cells, a multi-layer GhostGRU and a
causal language model built on it.

A GhostGRU layer of hidden size H computes m = ceil(H / s) "intrinsic" units with a GRU recurrence and the other
H - m "ghost" units with a cheap per-step map g = act(A i + c) of the intrinsic ones. The output at every step is
concat(intrinsic, ghost). Switches (the paper body is unread, docs/methods.md §4.2):

- variant A (feed_ghost_back: true): the carried state is the whole H-dim output; the candidate reads all of it
  and the reset/update gates read all of it (gate_input: full) or its intrinsic slice (gate_input: intrinsic);
- variant B (feed_ghost_back: false): a GRU of m units over (x_t, i_{t-1}); ghosts only form the output.

s = 1 is exactly torch.nn.GRU (same weights, same gate order r, z, n, reset applied after the matmul).
The recurrence itself lives in kernels/ghost_gru.py (torch reference and fused Triton kernel).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import require_choice
from fuxi.kernels import Implementation
from fuxi.kernels.ghost_gru import GhostActivation, check_ghost_act, ghost_gru_scan, ghost_gru_step_torch
from fuxi.model.config import GhostGateInput, ModelConfig
from fuxi.model.lm_head import GenerationMixin, LMHead
from fuxi.model.outputs import CausalLMOutput

logger = logging.getLogger(__name__)


def intrinsic_size(hidden_size: int, ratio: int) -> int:
    """m = ceil(H / s): the intrinsic slice is the first m features of every output."""
    return -(-hidden_size // ratio)


@dataclass(frozen=True)
class GhostGRUShape:
    """Every width of one GhostGRU layer, and the cost formulas of docs/methods.md §4.3 generalised to the switches."""

    input_size: int      # D
    hidden_size: int     # H, the output width
    intrinsic: int       # m
    state_size: int      # Hs: the carried state (H in variant A, m in variant B)
    gate_width: int      # K_rz: how much of the state the reset/update gates read
    candidate_width: int  # K_n: how much of the state the candidate reads

    @classmethod
    def of(cls, input_size: int, hidden_size: int, ratio: int = 2, feed_ghost_back: bool = True,
           gate_input: GhostGateInput = "full") -> GhostGRUShape:
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size/hidden_size: must be >= 1, got {input_size}/{hidden_size}")
        if not 1 <= ratio <= hidden_size:
            raise ValueError(f"ratio: must be in [1, hidden_size={hidden_size}], got {ratio}")
        require_choice("gate_input", gate_input, GhostGateInput)
        if not feed_ghost_back and gate_input == "full":
            raise ValueError("gate_input: 'full' needs feed_ghost_back=True (variant B carries only the "
                             "intrinsic state)")
        m = intrinsic_size(hidden_size, ratio)
        state = hidden_size if feed_ghost_back else m
        return cls(input_size, hidden_size, m, state, state if gate_input == "full" else m, state)

    @property
    def ghosts(self) -> int:
        return self.hidden_size - self.intrinsic

    def num_parameters(self) -> int:
        """3mD + 3m (W_ih, b_ih) + 2m K_rz + m K_n + 3m (U, b_hh) + G m + G (A, c).

        Variant A, gate_input full: 3m(D+H) + 6m + m(H-m) + (H-m); variant B: 3m(D+m) + 6m + m(H-m) + (H-m).
        """
        m, g = self.intrinsic, self.ghosts
        return 3 * m * self.input_size + 2 * m * self.gate_width + m * self.candidate_width + 6 * m + g * m + g

    def macs_per_step(self) -> int:
        """Multiply-accumulates per step and sequence: the parameter count without the bias terms."""
        m = self.intrinsic
        return 3 * m * self.input_size + 2 * m * self.gate_width + m * self.candidate_width + self.ghosts * m

    def saved_activations_per_step(self) -> int:
        """Elements the fused kernel keeps per step and sequence for backward: the output (H) and r, z, n, U_n h."""
        return self.hidden_size + 4 * self.intrinsic


class GhostGRUCell(nn.Module):
    """One GhostGRU layer. `forward` is one time step; `scan` runs a whole [B, T, D] sequence (fused kernel)."""

    def __init__(self, input_size: int, hidden_size: int, ratio: int = 2, feed_ghost_back: bool = True,
                 gate_input: GhostGateInput = "full", ghost_act: GhostActivation = "tanh",
                 impl: Implementation = "auto"):
        super().__init__()
        check_ghost_act(ghost_act)
        self.shape = GhostGRUShape.of(input_size, hidden_size, ratio, feed_ghost_back, gate_input)
        self.ratio, self.feed_ghost_back, self.gate_input = ratio, feed_ghost_back, gate_input
        self.ghost_act, self.impl = ghost_act, impl
        s = self.shape
        m, g = s.intrinsic, s.ghosts
        # Gate order r, z, n in every stacked weight, as torch.nn.GRU.
        self.weight_ih = nn.Parameter(torch.empty(3 * m, input_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * m))
        self.weight_hh_rz = nn.Parameter(torch.empty(2 * m, s.gate_width))
        self.weight_hh_n = nn.Parameter(torch.empty(m, s.candidate_width))
        self.bias_hh = nn.Parameter(torch.empty(3 * m))
        self.ghost_weight = nn.Parameter(torch.empty(g, m))  # A: the cheap operation
        self.ghost_bias = nn.Parameter(torch.empty(g))       # c
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(+-1/sqrt(m)): torch.nn.GRU's init for m units, and nn.Linear(m, G)'s bound for A and c."""
        bound = 1.0 / math.sqrt(self.shape.intrinsic)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = self.shape
        return (f"{s.input_size}, {s.hidden_size}, intrinsic={s.intrinsic}, ghosts={s.ghosts}, "
                f"variant={'A' if self.feed_ghost_back else 'B'}, gate_input={self.gate_input}, "
                f"ghost_act={self.ghost_act}")

    def initial_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.shape.state_size, device=device or self.weight_ih.device,
                           dtype=dtype or self.weight_ih.dtype)

    def _check_state(self, state: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if state is None:
            return self.initial_state(batch, like.device, like.dtype)
        if state.shape != (batch, self.shape.state_size):
            raise ValueError(f"state: expected [{batch}, {self.shape.state_size}], got {list(state.shape)}")
        return state

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: x [B, D], state [B, Hs] -> (out [B, H], new state [B, Hs])."""
        if x.dim() != 2 or x.shape[1] != self.shape.input_size:
            raise ValueError(f"x: expected [batch, {self.shape.input_size}], got {list(x.shape)}")
        state = self._check_state(state, x.shape[0], x)
        gx = nn.functional.linear(x, self.weight_ih, self.bias_ih)
        out = ghost_gru_step_torch(gx, state, self.weight_hh_rz, self.weight_hh_n, self.bias_hh,
                                   self.ghost_weight, self.ghost_bias, self.ghost_act)
        return out, out[:, : self.shape.state_size]

    def scan(self, x: torch.Tensor, state: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (out [B, T, H], final state [B, Hs]). keep [B, T]: 0 zeroes the state before step t."""
        if x.dim() != 3 or x.shape[2] != self.shape.input_size:
            raise ValueError(f"x: expected [batch, time, {self.shape.input_size}], got {list(x.shape)}")
        state = self._check_state(state, x.shape[0], x)
        gx = nn.functional.linear(x, self.weight_ih, self.bias_ih)  # W x_t + b_ih for every t in one matmul
        out = ghost_gru_scan(gx, self.weight_hh_rz, self.weight_hh_n, self.bias_hh, self.ghost_weight,
                             self.ghost_bias, state, keep, self.ghost_act, impl=self.impl)
        final = out[:, -1, : self.shape.state_size] if x.shape[1] else state
        return out, final


class GhostGRU(nn.Module):
    """A stack of GhostGRU layers over batch-first [B, T, D] input, with carried state [num_layers, B, Hs]."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, ratio: int = 2,
                 feed_ghost_back: bool = True, gate_input: GhostGateInput = "full",
                 ghost_act: GhostActivation = "tanh", impl: Implementation = "auto", checkpoint_layers: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            GhostGRUCell(input_size if i == 0 else hidden_size, hidden_size, ratio, feed_ghost_back, gate_input,
                         ghost_act, impl) for i in range(num_layers))
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.state_size = self.layers[0].shape.state_size
        self.checkpoint_layers = checkpoint_layers

    def initial_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.stack([layer.initial_state(batch, device, dtype) for layer in self.layers])

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], state [L, B, Hs] or None (zeros) -> (out [B, T, H], final state [L, B, Hs])."""
        if state is not None and state.shape[0] != self.num_layers:
            raise ValueError(f"state: expected {self.num_layers} layers first, got {list(state.shape)}")
        finals = []
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else state[i]
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x, final = checkpoint(layer.scan, x, layer_state, keep, use_reentrant=False)
            else:
                x, final = layer.scan(x, layer_state, keep)
            finals.append(final)
        return x, torch.stack(finals)

    def step(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step for streaming: x [B, D], state [L, B, Hs] -> (out [B, H], new state [L, B, Hs])."""
        finals = []
        for i, layer in enumerate(self.layers):
            x, final = layer(x, None if state is None else state[i])
            finals.append(final)
        return x, torch.stack(finals)

    @torch.no_grad()
    def load_gru_(self, gru: nn.GRU) -> GhostGRU:
        """Copy the weights of a torch.nn.GRU into this stack. Only s = 1 has the same shapes (a plain GRU)."""
        if gru.bidirectional or not gru.bias or gru.proj_size:
            raise ValueError("gru: only unidirectional nn.GRU with biases and no projection can be loaded")
        if gru.num_layers != self.num_layers or gru.hidden_size != self.hidden_size:
            raise ValueError(f"gru: {gru.num_layers} layers x {gru.hidden_size} units; this stack has "
                             f"{self.num_layers} x {self.hidden_size}")
        for i, layer in enumerate(self.layers):
            if layer.shape.ghosts:
                raise ValueError(f"ratio: {layer.ratio} leaves ghost units; only ratio 1 matches nn.GRU's shapes")
            weight_hh = getattr(gru, f"weight_hh_l{i}")
            h = self.hidden_size
            layer.weight_ih.copy_(getattr(gru, f"weight_ih_l{i}"))
            layer.bias_ih.copy_(getattr(gru, f"bias_ih_l{i}"))
            layer.weight_hh_rz.copy_(weight_hh[: 2 * h])
            layer.weight_hh_n.copy_(weight_hh[2 * h:])
            layer.bias_hh.copy_(getattr(gru, f"bias_hh_l{i}"))
        return self


class GhostRNNForCausalLM(GenerationMixin, nn.Module):
    """Token embedding -> GhostGRU stack -> untied lm_head. model.type: ghostrnn_lm.

    Uses ModelConfig's vocab_size (padded), hidden_size (embedding and every layer), num_layers, kernels,
    document_masking (the state is reset where doc_ids change), activation_checkpointing (per layer),
    init_std (lm_head) and the `ghostrnn` block. The attention fields are unused.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        ghost = config.ghostrnn
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.rnn = GhostGRU(config.hidden_size, config.hidden_size, config.num_layers, ghost.ratio,
                            ghost.feed_ghost_back, ghost.gate_input, ghost.ghost_act, impl=config.kernels,
                            checkpoint_layers=config.activation_checkpointing)
        self.lm_head = LMHead(config.hidden_size, config.padded_vocab_size, config.kernels)
        self.reset_parameters()
        shape = self.layer_shape
        gru = GhostGRUShape.of(config.hidden_size, config.hidden_size, 1)
        logger.info("ghostrnn_lm: variant %s, s=%d, gate_input=%s, ghost_act=%s; %d intrinsic + %d ghost units; "
                    "%s parameters (%s per GhostGRU layer, %.1f%% of a GRU layer's %s)",
                    ghost.variant, ghost.ratio, ghost.gate_input, ghost.ghost_act, shape.intrinsic, shape.ghosts,
                    f"{self.num_parameters():,}", f"{shape.num_parameters():,}",
                    100.0 * shape.num_parameters() / gru.num_parameters(), f"{gru.num_parameters():,}")

    @classmethod
    def validate_config(cls, config: ModelConfig) -> None:
        ghost = config.ghostrnn
        if ghost is None:
            raise ConfigError("ghostrnn", "model.type 'ghostrnn_lm' needs a `ghostrnn:` block "
                              "(ratio, feed_ghost_back, gate_input, ghost_act)")
        if ghost.ratio > config.hidden_size:
            raise ConfigError("ghostrnn.ratio", f"{ghost.ratio} exceeds hidden_size {config.hidden_size}")

    def reset_parameters(self) -> None:
        """Embedding N(0, 1) (nn.Embedding's default: GRU pre-activations start O(1)); lm_head N(0, init_std);
        each GhostGRU layer as torch.nn.GRU."""
        nn.init.normal_(self.embed_tokens.weight, 0.0, 1.0)
        nn.init.normal_(self.lm_head.weight, 0.0, self.config.init_std)
        for layer in self.rnn.layers:
            layer.reset_parameters()

    @property
    def layer_shape(self) -> GhostGRUShape:
        return self.rnn.layers[0].shape

    def document_keep_mask(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] with 0 where a new document starts inside the sequence: the recurrent state restarts there."""
        keep = torch.ones(doc_ids.shape, dtype=torch.float32, device=doc_ids.device)
        keep[:, 1:] = (doc_ids[:, 1:] == doc_ids[:, :-1]).float()
        return keep

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, state: torch.Tensor | None = None,
                return_logits: bool | None = None, z_loss: float = 0.0,
                kv_cache: torch.Tensor | None = None) -> CausalLMOutput:
        """labels are already shifted (labels[t] is the token after input_ids[t]); -100 is ignored.

        state [num_layers, B, Hs] continues a stream (`kv_cache` is accepted as its alias, the name the shared
        `generate` of model/lm_head.py uses); the final state is returned in `CausalLMOutput.kv_cache`.
        """
        if state is None:
            state = kv_cache
        keep = None
        if doc_ids is not None and self.config.document_masking:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids: expected shape {list(input_ids.shape)}, got {list(doc_ids.shape)}")
            keep = self.document_keep_mask(doc_ids)
        hidden, final_state = self.rnn(self.embed_tokens(input_ids), state, keep)
        return self.lm_head.output(hidden, labels, z_loss, return_logits, CausalLMOutput(kv_cache=final_state))

    # ---- accounting used by `fuxi info`, the trainer's MFU and the tests -------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed_tokens.weight.numel() if exclude_embeddings else total

    def macs_per_token(self) -> int:
        """Forward multiply-accumulates per token: every GhostGRU layer's per-step MACs plus the lm_head."""
        layers = sum(layer.shape.macs_per_step() for layer in self.rnn.layers)
        return layers + self.config.hidden_size * self.config.padded_vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token = 3 (forward + backward) x 2 x forward MACs = 6 x macs_per_token().

        Independent of seq_len (a recurrence has no attention term); elementwise gate math and the embedding
        lookup are not counted, as in the transformer's 6N.
        """
        del seq_len
        return 6.0 * self.macs_per_token()


# ---- the redundancy diagnostic of docs/methods.md §4.6.6 -----------------------------------------------------------

def dimension_cosine_similarity(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] (any batch/time layout) -> [H, H] cosine similarity between hidden dimensions, each
    dimension being the vector of its values over all batch and time positions. Dead (all-zero) units get 0."""
    flat = hidden.reshape(-1, hidden.shape[-1]).double()
    norms = flat.norm(dim=0)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (unit.t() @ unit).float()


def redundancy_fraction(hidden: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of the H(H-1)/2 pairs of distinct hidden dimensions with |cos| > threshold."""
    cos = dimension_cosine_similarity(hidden).abs()
    h = cos.shape[0]
    if h < 2:
        raise ValueError(f"hidden: need at least 2 dimensions, got {h}")
    upper = torch.triu_indices(h, h, offset=1)
    return float((cos[upper[0], upper[1]] > threshold).double().mean())
