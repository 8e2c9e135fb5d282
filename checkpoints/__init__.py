"""Checkpoints: our plain format (safetensors + config.yaml) and conversion to and from Hugging Face."""
from fuxi.checkpoints.hf_export import export_to_hf
from fuxi.checkpoints.hf_import import import_from_hf
from fuxi.checkpoints.model_checkpoint import load_model, read_model_config, save_model
from fuxi.checkpoints.sharded_safetensors import CheckpointError

__all__ = ["CheckpointError", "export_to_hf", "import_from_hf", "load_model", "read_model_config", "save_model"]
