"""The model config: one dataclass for every architecture the registry knows (`type`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.typed_config import ConfigError, apply_overrides, from_dict, read_yaml

KERNEL_CHOICES = ("auto", "triton", "torch")
ATTENTION_CHOICES = ("auto", "sdpa", "flash")
GHOST_GATE_INPUTS = ("full", "intrinsic")
GHOST_ACTIVATIONS = ("identity", "tanh", "relu", "sigmoid")  # kept equal to kernels.ghost_gru's (a test checks)


@dataclass
class GhostRNNConfig:
    """The GhostGRU switches of methods.md 4.2 (the paper body is unread, so each open choice is a switch).

    ratio s: intrinsic units m = ceil(hidden_size / s), ghost units hidden_size - m (s = 1 is a plain GRU).
    feed_ghost_back: variant A (true; the carried state is concat(intrinsic, ghost)) or B (false; a GRU of m
    units, ghosts only form the layer output). gate_input: whether the reset/update gates read the full carried
    state or only its intrinsic slice (variant B has only the intrinsic slice). ghost_act: the activation after
    the cheap linear map.
    """

    ratio: int = 2
    feed_ghost_back: bool = True
    gate_input: str = "full"
    ghost_act: str = "tanh"

    @property
    def variant(self) -> str:
        return "A" if self.feed_ghost_back else "B"

    def validate(self) -> None:
        if self.ratio < 1:
            raise ConfigError(f"ratio: must be >= 1, got {self.ratio}")
        if self.gate_input not in GHOST_GATE_INPUTS:
            raise ConfigError(f"gate_input: {self.gate_input!r} is not one of {list(GHOST_GATE_INPUTS)}")
        if self.ghost_act not in GHOST_ACTIVATIONS:
            raise ConfigError(f"ghost_act: {self.ghost_act!r} is not one of {list(GHOST_ACTIVATIONS)}")
        if not self.feed_ghost_back and self.gate_input == "full":
            raise ConfigError("gate_input: 'full' needs feed_ghost_back: true (variant B carries only the "
                              "intrinsic state); use gate_input: intrinsic")


@dataclass
class ModelConfig:
    """Defaults are the published FuxiTranyu-8B (methods.md 1.2): 8,094,724,096 parameters."""

    type: str = "fuxitranyu"
    vocab_size: int = 250_680
    # Pad the embedding/lm_head rows up to a multiple of this (128 gives the report's 250,752). 1 = no padding.
    pad_vocab_multiple: int = 1
    hidden_size: int = 4096
    num_layers: int = 30
    num_heads: int = 32
    ffn_hidden_size: int = 16_384
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    init_std: float = 0.01
    # GPT-2/Megatron "scaled init": o_proj and down_proj get init_std / sqrt(2 * num_layers), so the residual
    # stream's variance does not grow with depth.
    scaled_residual_init: bool = True
    attention_dropout: float = 0.0
    # Attention across document boundaries of a packed sequence is blocked when doc_ids are given and this is on.
    document_masking: bool = False
    activation_checkpointing: bool = False
    kernels: str = "auto"
    attention: str = "auto"
    bos_token_id: int = 0
    eos_token_id: int = 0
    # The GhostRNN switches; required when type is "ghostrnn_lm" (model/ghostrnn.py), ignored otherwise.
    ghostrnn: GhostRNNConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")

        for name in ("vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads",
                     "ffn_hidden_size", "max_seq_len", "rms_norm_eps", "rope_theta", "init_std"):
            positive(name)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.head_dim % 2:
            raise ConfigError(f"num_heads: head_dim {self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout: must be in [0, 1), got {self.attention_dropout}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels: {self.kernels!r} is not one of {list(KERNEL_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention: {self.attention!r} is not one of {list(ATTENTION_CHOICES)}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}: {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")
        from model.registry import validate_model_type  # late: the registry imports the model files

        validate_model_type(self)

    def check_tokenizer(self, tokenizer_vocab_size: int, source: str = "tokenizer") -> None:
        """The embedding must have a row for every id the tokenizer can produce."""
        if tokenizer_vocab_size > self.vocab_size:
            raise ConfigError(f"vocab_size: {self.vocab_size} is smaller than the {source}'s "
                              f"{tokenizer_vocab_size} tokens")


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model YAML holds the ModelConfig fields at its top level, or under a `model:` key."""
    data = read_yaml(path)
    if isinstance(data.get("model"), dict):
        data = data["model"]
    source = str(path) + (" with --set " + " ".join(overrides) if overrides else "")
    return from_dict(ModelConfig, apply_overrides(data, overrides), source=source)
