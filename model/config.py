"""The model config: one dataclass for every architecture the registry knows (`type`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fuxi.common.errors import ConfigError
from fuxi.common.typed_config import apply_overrides, check_choices, from_dict, read_yaml, require_at_least
from fuxi.kernels import Implementation
from fuxi.kernels.ghost_gru import GhostActivation
from fuxi.model.attention import AttentionBackend

GhostGateInput = Literal["full", "intrinsic"]
MoELossForm = Literal["paper", "code"]
ExpertCompute = Literal["auto", "loop", "grouped_mm"]
MLPKind = Literal["gelu", "swiglu"]
AttentionBias = Literal["all", "qkv", "none"]
RopeType = Literal["linear", "dynamic", "llama3"]
Family = Literal["fuxitranyu", "llama", "qwen2", "mistral"]


@dataclass
class RopeScalingConfig:
    """RoPE scaling as transformers defines it (HF `rope_scaling` / `rope_parameters`; model/rope.py).

    linear: every inverse frequency / factor. dynamic (NTK): past max_seq_len (HF max_position_embeddings) the
    base grows with the sequence length. llama3 (Llama 3.1+): long wavelengths / factor, short ones unchanged,
    a smooth blend between, with low_freq_factor, high_freq_factor and original_max_position_embeddings.
    """

    rope_type: RopeType = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0        # llama3 only
    high_freq_factor: float = 4.0       # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def validate(self) -> None:
        check_choices(self)
        if self.factor < 1.0:
            raise ConfigError("factor", f"must be >= 1, got {self.factor}")
        if self.rope_type == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ConfigError("high_freq_factor", f"must exceed low_freq_factor > 0, got "
                                  f"{self.low_freq_factor} and {self.high_freq_factor}")
            require_at_least(self, 1, "original_max_position_embeddings")


@dataclass
class GhostRNNConfig:
    """The GhostGRU switches of docs/methods.md §4.2 (the paper body is unread, so each open choice is a switch).

    ratio s: intrinsic units m = ceil(hidden_size / s), ghost units hidden_size - m (s = 1 is a plain GRU).
    feed_ghost_back: variant A (true; the carried state is concat(intrinsic, ghost)) or B (false; a GRU of m
    units, ghosts only form the layer output). gate_input: whether the reset/update gates read the full carried
    state or only its intrinsic slice (variant B has only the intrinsic slice). ghost_act: the activation after
    the cheap linear map.
    """

    ratio: int = 2
    feed_ghost_back: bool = True
    gate_input: GhostGateInput = "full"
    ghost_act: GhostActivation = "tanh"

    @property
    def variant(self) -> str:
        return "A" if self.feed_ghost_back else "B"

    def validate(self) -> None:
        check_choices(self)
        require_at_least(self, 1, "ratio")
        if not self.feed_ghost_back and self.gate_input == "full":
            raise ConfigError("gate_input", "'full' needs feed_ghost_back: true (variant B carries only the "
                              "intrinsic state); use gate_input: intrinsic")


@dataclass
class MoEConfig:
    """MoE-LPR upcycling (docs/methods.md §2): every chosen FFN becomes `num_experts` experts, expert 0 the original.

    top_k >= 2 renormalises the K router weights (function-preserving at upcycling); top_k = 1 renormalised is
    a hard weight of 1, and `top1_code_compat` gives the released code's unrenormalised p_max instead.
    balance_loss_coef (stage 1) and lpr_loss_coef (stage 2) are mutually exclusive, as in the released code.
    Forms: "code" (the released code, default for both: balance N sum_e f_e P_e, K at uniform routing; LPR a
    cross-entropy with target 0 over the softmax probabilities) or "paper" (balance K times smaller; LPR
    -log G_0, whose router gradient is N times stronger at uniform routing, 6x measured at N=4). alpha=0.01 and
    gamma=0.1 were tuned with the code forms; docs/moe_lpr.md gives the paper-form gamma with the same pull.
    layers: indices of the layers to upcycle (null: all). original_languages: language codes whose tokens
    the LPR pulls to expert 0 (the trainer turns per-token lang ids into the model's `original_mask`).
    expert_compute: "loop" over experts on contiguous slices, "grouped_mm" (torch's grouped GEMM), or "auto".
    """

    num_experts: int = 6
    top_k: int = 2
    top1_code_compat: bool = False
    balance_loss_coef: float = 0.01
    balance_loss_form: MoELossForm = "code"
    lpr_loss_coef: float = 0.0
    lpr_loss_form: MoELossForm = "code"
    layers: list[int] | None = None
    original_languages: list[str] = field(default_factory=list)
    expert_compute: ExpertCompute = "auto"

    def validate(self) -> None:
        check_choices(self)
        if self.num_experts < 2:
            raise ConfigError("num_experts", f"must be >= 2 (expert 0 plus at least one copy), got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.top1_code_compat and self.top_k != 1:
            raise ConfigError("top1_code_compat", f"only meaningful with top_k: 1, got top_k: {self.top_k}")
        require_at_least(self, 0, "balance_loss_coef", "lpr_loss_coef")
        if self.balance_loss_coef > 0 and self.lpr_loss_coef > 0:
            raise ConfigError("lpr_loss_coef", f"the balance loss (stage 1, balance_loss_coef="
                              f"{self.balance_loss_coef}) and the LPR loss (stage 2, lpr_loss_coef="
                              f"{self.lpr_loss_coef}) are mutually exclusive; set one of them to 0")
        if self.layers is not None:
            if not self.layers:
                raise ConfigError("layers", "empty list; use null for all layers")
            if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
                raise ConfigError("layers", f"must be distinct non-negative layer indices, got {self.layers}")
        if len(set(self.original_languages)) != len(self.original_languages) or \
                any(not lang for lang in self.original_languages):
            raise ConfigError("original_languages", f"must be distinct non-empty codes, got {self.original_languages}")

    def moe_layers(self, num_layers: int) -> list[int]:
        """The upcycled layer indices, sorted."""
        return list(range(num_layers)) if self.layers is None else sorted(self.layers)


@dataclass
class ModelConfig:
    """Defaults are the published FuxiTranyu-8B (docs/methods.md §1.2): 8,094,724,096 parameters.

    The architecture switches (mlp ... rope_scaling) let the same decoder hold the Llama family; each names the
    Hugging Face config field it maps to. `family` is the HF model_type `convert to-hf` writes back.
    """

    type: str = "fuxitranyu"
    vocab_size: int = 250_680
    # Pad the embedding/lm_head rows up to a multiple of this (128 gives the report's 250,752). 1 = no padding.
    pad_vocab_multiple: int = 1
    hidden_size: int = 4096
    num_layers: int = 30
    num_heads: int = 32
    ffn_hidden_size: int = 16_384
    max_seq_len: int = 4096                # HF max_position_embeddings
    rms_norm_eps: float = 1e-5             # HF rms_norm_eps
    rope_theta: float = 10_000.0           # HF rope_theta
    # HF hidden_act + the MLP's layout: "gelu" = FuxiTranyu's non-gated up -> gelu_fast -> down (arcee,
    # gelu_pytorch_tanh); "swiglu" = Llama's down(silu(gate(x)) * up(x)) (llama/qwen2/mistral, silu).
    mlp: MLPKind = "gelu"
    # HF num_key_value_heads: grouped-query attention with this many k/v heads (null: num_heads, i.e. MHA).
    num_kv_heads: int | None = None
    # HF attention_bias (llama: q/k/v/o) and Qwen2's fixed q/k/v bias: "all" (FuxiTranyu), "qkv", "none".
    attention_bias: AttentionBias = "all"
    mlp_bias: bool = True                  # HF mlp_bias
    tie_word_embeddings: bool = False      # HF tie_word_embeddings: lm_head shares the embedding matrix
    rope_scaling: RopeScalingConfig | None = None  # HF rope_scaling (null: plain RoPE)
    family: Family = "fuxitranyu"          # HF model_type written by `convert to-hf`
    init_std: float = 0.01
    # GPT-2/Megatron "scaled init": o_proj and down_proj get init_std / sqrt(2 * num_layers), so the residual
    # stream's variance does not grow with depth.
    scaled_residual_init: bool = True
    attention_dropout: float = 0.0
    # Attention across document boundaries of a packed sequence is blocked when doc_ids are given and this is on.
    document_masking: bool = False
    activation_checkpointing: bool = False
    kernels: Implementation = "auto"
    attention: AttentionBackend = "auto"
    bos_token_id: int = 0
    eos_token_id: int = 0
    # The GhostRNN switches; required when type is "ghostrnn_lm" (model/ghostrnn.py), ignored otherwise.
    ghostrnn: GhostRNNConfig | None = None
    # The MoE-LPR switches; required when type is "fuxitranyu_moe" (model/fuxitranyu_moe.py), ignored otherwise.
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        check_choices(self)
        require_at_least(self, 1, "vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads",
                         "ffn_hidden_size", "max_seq_len")
        for name in ("rms_norm_eps", "rope_theta", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("attention_dropout", f"must be in [0, 1), got {self.attention_dropout}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(name, f"{getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ConfigError("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads {self.num_heads}")
        check_family(self)
        for name in ("ghostrnn", "moe", "rope_scaling"):  # from_dict validates them on load, this a config built in code
            block = getattr(self, name)
            if block is not None:
                try:
                    block.validate()
                except ConfigError as err:
                    raise err.under(f"{name}.") from None
        from fuxi.model.registry import validate_model_type  # late: the registry imports the model files

        validate_model_type(self)  # what only one architecture needs (attention heads, MoE or GhostRNN blocks)

    def check_tokenizer(self, tokenizer_vocab_size: int, source: str = "tokenizer") -> None:
        """The embedding must have a row for every id the tokenizer can produce."""
        if tokenizer_vocab_size > self.vocab_size:
            raise ConfigError("vocab_size", f"{self.vocab_size} is smaller than the {source}'s "
                              f"{tokenizer_vocab_size} tokens")


# What each Hugging Face family's native class can hold (checkpoints/hf_export.py writes it).
FAMILY_RULES: dict[str, dict[str, tuple]] = {
    "fuxitranyu": {"mlp": ("gelu",), "attention_bias": ("all",), "mlp_bias": (True,), "num_kv_heads": (None,),
                   "tie_word_embeddings": (False,)},
    "llama": {"mlp": ("swiglu",), "attention_bias": ("all", "none")},
    "qwen2": {"mlp": ("swiglu",), "attention_bias": ("qkv",), "mlp_bias": (False,)},
    "mistral": {"mlp": ("swiglu",), "attention_bias": ("none",), "mlp_bias": (False,)},
}


def check_family(config: ModelConfig) -> None:
    """The architecture switches must be ones the family's Hugging Face class computes."""
    if config.family == "fuxitranyu" and config.rope_scaling is not None:
        raise ConfigError("rope_scaling", "the fuxitranyu family uses plain RoPE; set family: llama")
    for key, allowed in FAMILY_RULES[config.family].items():
        if getattr(config, key) not in allowed:
            raise ConfigError(key, f"{getattr(config, key)!r} is not what family {config.family!r} holds "
                              f"({' or '.join(repr(a) for a in allowed)})")


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model YAML holds the ModelConfig fields at its top level, or under a `model:` key."""
    data = read_yaml(path)
    if isinstance(data.get("model"), dict):
        data = data["model"]
    source = str(path) + (" with --set " + " ".join(overrides) if overrides else "")
    return from_dict(ModelConfig, apply_overrides(data, overrides), source=source)
