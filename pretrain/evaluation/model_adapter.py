"""Our language model as lm-evaluation-harness's Hugging Face wrapper (`HFLM(pretrained=<model object>)`) sees a
transformers causal LM: a `config` with the context length, a `device`, and `model(input_ids).logits`.

The harness does everything else (prompts, few-shot sampling, batching, rolling windows, metrics). The wrapped
module may be a plain model or a DeepSpeed engine in training: its forward is called as is, so ZeRO-3 gathers
each layer's parameters as usual (every rank must then run the same evaluation; see in_loop.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from fuxi.model import ModelConfig


class HarnessModel(torch.nn.Module):
    """Wraps `module` (our FuxiTranyu, MoE-LPR or GhostRNN LM, or a DeepSpeed engine around one). Logits are
    returned for every vocabulary row, padding rows included, exactly as the Hugging Face export computes them."""

    def __init__(self, module: torch.nn.Module, config: ModelConfig, device: torch.device | str,
                 name_or_path: str = ""):
        super().__init__()
        import transformers

        self.module = module
        self._device = torch.device(device)
        self.config = transformers.PretrainedConfig(
            max_position_embeddings=config.max_seq_len, vocab_size=config.padded_vocab_size,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, name_or_path=name_or_path)
        self.config.model_type = config.type  # not a transformers type: the harness is told backend="causal"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    def tie_weights(self) -> None:
        """FuxiTranyu's embeddings are untied; the harness calls this on every model."""

    def num_parameters(self) -> int:
        # ZeRO-3 keeps each parameter's full size in ds_numel; elsewhere numel is the size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.module.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        # The harness pads on the right for causal models and reads only real positions, so no mask is needed
        # (a transformers model ignores it the same way in that case).
        return SimpleNamespace(logits=self.module(input_ids).logits)
