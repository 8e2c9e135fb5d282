"""Model architectures: FuxiTranyu dense (and, built on it, MoE-LPR), GhostRNN language models."""
from fuxi.model.config import ModelConfig, load_model_config
from fuxi.model.outputs import CausalLMOutput
from fuxi.model.registry import build_model, model_class, register_model

__all__ = ["CausalLMOutput", "ModelConfig", "build_model", "load_model_config", "model_class", "register_model"]
