"""What `fuxi eval --checkpoint` points at, made into the harness's Hugging Face model wrapper (`HFLM`).

- our plain checkpoint (`config.yaml` + safetensors), or a DeepSpeed training checkpoint of any ZeRO stage and
  world size (consolidated in memory): our model, dense or MoE-LPR (or GhostRNN), wrapped by HarnessModel;
- a Hugging Face directory of a native transformers class (our default export, Llama, ...): handed to the harness
  by path, which loads it as `lm_eval --model hf` does;
- a Hugging Face directory in our remote-code layouts (TJUNLP `fuxitranyu`, `fuxitranyu_moe`): imported into our
  model in memory, so no code shipped with the checkpoint runs. Other remote-code models only with
  `trust_remote_code=True`.

The tokenizer is the checkpoint's own (`tokenizer/` beside our weights, or the HF directory's files) unless one
is given; ours goes through the same file rewrite as the HF export, so both tokenize identically.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fuxi.checkpoints.sharded_safetensors import CheckpointError
from fuxi.common.errors import ConfigError
from fuxi.pretrain.evaluation.errors import EvalError

# "auto": bfloat16 on a GPU, float32 on a CPU (whatever the checkpoint stores).
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUR_REMOTE_CODE_TYPES = ("fuxitranyu", "fuxitranyu_moe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    path: str
    # "hf": a native transformers class, loaded by the harness; "hf-imported": our layouts, read without remote code
    kind: Literal["ours", "deepspeed", "hf", "hf-imported"]
    model_type: str
    tokenizer_dir: str
    details: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _our_tokenizer_dir(checkpoint: Path, tokenizer: str | None) -> str:
    chosen = Path(tokenizer) if tokenizer else checkpoint / "tokenizer"
    if not _has_tokenizer(chosen):
        if tokenizer:
            raise EvalError(f"--tokenizer {tokenizer}: no tokenizer.json in it")
        raise EvalError(f"{checkpoint}: no tokenizer/ beside the weights (the trainer stores it when run.tokenizer "
                        "is set); pass --tokenizer DIR, the tokenizer the model was trained with")
    return str(chosen)


def inspect_checkpoint(path: str | Path, tokenizer: str | None = None) -> ModelSource:
    """Decide what `path` is, without reading any weights."""
    from fuxi.checkpoints.deepspeed_checkpoint import MODEL_CONFIG_FILE, is_deepspeed_checkpoint, resolve_tag_dir
    from fuxi.checkpoints.model_checkpoint import is_model_checkpoint, read_model_config

    path = Path(path)
    if not path.exists():
        raise EvalError(f"--checkpoint {path}: no such file or directory")
    if is_model_checkpoint(path):
        config = read_model_config(path)
        return ModelSource(str(path), "ours", config.type, _our_tokenizer_dir(path, tokenizer))
    if is_deepspeed_checkpoint(path):
        tag_dir = resolve_tag_dir(path)
        config = read_model_config(tag_dir / MODEL_CONFIG_FILE)
        return ModelSource(str(path), "deepspeed", config.type, _our_tokenizer_dir(tag_dir, tokenizer),
                           {"tag_dir": str(tag_dir)})
    config_json = path / "config.json"
    if config_json.is_file():
        try:
            hf_config = json.loads(config_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EvalError(f"{config_json}: not JSON ({err})") from None
        tokenizer_dir = Path(tokenizer) if tokenizer else path
        if not _has_tokenizer(tokenizer_dir):
            raise EvalError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                            "--tokenizer DIR")
        model_type = str(hf_config.get("model_type"))
        remote = "auto_map" in hf_config
        kind = "hf-imported" if remote and model_type in OUR_REMOTE_CODE_TYPES else "hf"
        return ModelSource(str(path), kind, model_type, str(tokenizer_dir), {"remote_code": remote})
    if (path / "checkpoints").is_dir():
        raise EvalError(f"--checkpoint {path}: a run directory; pass --checkpoint {path / 'checkpoints'} (its "
                        f"latest checkpoint) or --run {path} (every checkpoint)")
    raise EvalError(f"--checkpoint {path}: not a checkpoint (no config.yaml of ours, no DeepSpeed "
                    "*model_states.pt with model_config.yaml, no Hugging Face config.json)")


def load_our_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Our model with the weights of an "ours", "deepspeed" or "hf-imported" source, in eval mode."""
    from fuxi.checkpoints.deepspeed_checkpoint import MODEL_CONFIG_FILE, consolidated_state_dict
    from fuxi.checkpoints.hf_import import read_hf_checkpoint
    from fuxi.checkpoints.model_checkpoint import load_model, model_from_tensors, read_model_config

    if source.kind == "ours":
        model = load_model(source.path, device=device, dtype=dtype)
    elif source.kind == "deepspeed":
        tag_dir = Path(source.details["tag_dir"])
        config = read_model_config(tag_dir / MODEL_CONFIG_FILE)
        model = model_from_tensors(config, consolidated_state_dict(tag_dir).items(), str(tag_dir), device, dtype)
    elif source.kind == "hf-imported":
        config, tensors = read_hf_checkpoint(source.path)
        model = model_from_tensors(config, tensors, source.path, device, dtype)
    else:
        raise ValueError(f"{source.path} is a native Hugging Face model: the harness loads it by path")
    return model.eval()


def harness_tokenizer(tokenizer_dir: str, config, workdir: Path):
    """A transformers tokenizer with the files the HF export would ship (pad = eos, model_max_length, ids
    checked against the model config)."""
    from transformers import AutoTokenizer

    from fuxi.checkpoints.hf_export import export_tokenizer

    out = workdir / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    export_tokenizer(tokenizer_dir, out, config)
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


def build_harness_lm(source: ModelSource, device: str = "auto", dtype: Dtype = "auto", batch_size: int | str = 8,
                     trust_remote_code: bool = False):
    """The harness's `HFLM` for `source`."""
    from lm_eval.models.huggingface import HFLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.kind == "hf":
        if source.details.get("remote_code") and not trust_remote_code:
            raise EvalError(f"{source.path}/config.json: model_type {source.model_type!r} needs remote code "
                            "(auto_map); fuxi eval never runs code from a checkpoint unless --trust-remote-code")
        return HFLM(pretrained=source.path, tokenizer=source.tokenizer_dir, device=str(torch_device),
                    dtype=torch_dtype, batch_size=batch_size, trust_remote_code=trust_remote_code,
                    backend="causal")
    model = load_our_model(source, torch_device, torch_dtype)
    return our_model_lm(model, model.config, source.tokenizer_dir, torch_device, batch_size, source.path)


def our_model_lm(module: torch.nn.Module, config, tokenizer_dir: str, device: torch.device,
                 batch_size: int | str = 8, name: str = ""):
    """HFLM around one of our models (or a DeepSpeed engine holding one)."""
    from lm_eval.models.huggingface import HFLM

    from fuxi.pretrain.evaluation.model_adapter import HarnessModel

    with tempfile.TemporaryDirectory(prefix="fuxi-eval-") as tmp:
        try:
            tokenizer = harness_tokenizer(tokenizer_dir, config, Path(tmp))
        except CheckpointError as err:
            raise EvalError(str(err)) from None
    try:
        config.check_tokenizer(len(tokenizer), tokenizer_dir)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    return HFLM(pretrained=HarnessModel(module, config, device, name), tokenizer=tokenizer,
                batch_size=batch_size, backend="causal")
