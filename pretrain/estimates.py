"""Back-of-envelope arithmetic a pretraining run is planned with: FLOPs per token, ZeRO model-state memory,
logits size, and MFU. The formulas are unit-tested against hand-computed values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fuxi.model import ModelConfig, build_model

# ZeRO paper (arXiv 1910.02054): mixed-precision Adam keeps 2 (bf16 params) + 2 (bf16 grads) + 12 (fp32 master,
# momentum, variance) = 16 bytes per parameter.
PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12

# Dense bf16 peak TFLOP/s per device (no sparsity, NVIDIA's datasheets: half the "with sparsity" figure), for
# MFU. Matched in order by substring of torch.cuda.get_device_name(), so the specific names come first:
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H200 NVL", "NVIDIA H200".
PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100-PCIE": 756.0, "H100 NVL": 835.5, "H100-SXM": 989.4, "H100 80GB HBM3": 989.4,
    "H100 SXM": 989.4, "H200 NVL": 835.5, "H200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
}


def zero_model_state_bytes(num_params: int, world_size: int, stage: int) -> float:
    """Per-rank bytes of parameters + gradients + optimizer states under ZeRO stage 0-3."""
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    psi, nd = float(num_params), float(world_size)
    if stage == 0:
        return (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) * psi
    if stage == 1:
        return (PARAM_BYTES + GRAD_BYTES) * psi + OPTIMIZER_BYTES * psi / nd
    if stage == 2:
        return PARAM_BYTES * psi + (GRAD_BYTES + OPTIMIZER_BYTES) * psi / nd
    if stage == 3:
        return (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) * psi / nd
    raise ValueError(f"zero stage: must be 0, 1, 2 or 3, got {stage}")


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' dense peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * num_devices)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (the model's own count: 6N + 12·L·h·s for attention models, 6N_active for
    MoE, 6x MACs for GhostRNN), from the config alone: the model is built on the meta device, so it costs no
    memory, and ZeRO-3 (which leaves each rank's live parameters empty) cannot change the count. `fuxi info`,
    the trainer's MFU and `fuxi bench train` all use this."""
    return build_model(config, device="meta").flops_per_token(seq_len)


def peak_tflops_for(device_name: str) -> float | None:
    """Look the device up by substring of torch.cuda.get_device_name (None when unknown)."""
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


@dataclass
class ModelReport:
    model_type: str
    parameters: int
    parameters_without_embedding: int
    flops_per_token: float
    seq_len: int
    world_size: int
    model_state_gb_per_rank: dict
    logits_gb_bf16: float
    logits_gb_fp32: float
    architecture: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def model_report(config: ModelConfig, world_size: int = 8, seq_len: int | None = None,
                 micro_batch: int = 1) -> ModelReport:
    """Built on the meta device, so the 8B model costs no memory."""
    model = build_model(config, device="meta")
    seq_len = seq_len or config.max_seq_len
    params = model.num_parameters()
    vocab_rows = config.padded_vocab_size
    logits = micro_batch * seq_len * vocab_rows
    return ModelReport(
        model_type=config.type,
        parameters=params,
        parameters_without_embedding=model.num_parameters(exclude_embeddings=True),
        flops_per_token=model.flops_per_token(seq_len),
        seq_len=seq_len,
        world_size=world_size,
        model_state_gb_per_rank={f"zero{s}": zero_model_state_bytes(params, world_size, s) / 1e9 for s in range(4)},
        logits_gb_bf16=logits * 2 / 1e9,
        logits_gb_fp32=logits * 4 / 1e9,
        architecture=architecture_summary(config),
    )


def architecture_summary(config: ModelConfig) -> str:
    """One line: the Hugging Face family and the switches that make it (model/config.py)."""
    if config.type == "ghostrnn_lm":
        return "GhostRNN"
    rope = f"rope {config.rope_scaling.rope_type} x{config.rope_scaling.factor:g}" if config.rope_scaling else "rope"
    return (f"{config.family}: {config.mlp} MLP{' (biased)' if config.mlp_bias else ''}, {config.num_heads} heads / "
            f"{config.kv_heads} kv heads, attention bias {config.attention_bias}, "
            f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings, {rope} theta {config.rope_theta:g}")


def format_report(report: ModelReport) -> str:
    lines = [
        f"model type                      {report.model_type}",
        f"architecture                    {report.architecture}",
        f"parameters                      {report.parameters:,}",
        f"parameters without embedding    {report.parameters_without_embedding:,}",
        f"training FLOPs per token        {report.flops_per_token / 1e9:,.2f} GFLOP  (the model's own count at seq {report.seq_len}: 6N + 12Lhs for attention models)",
        f"model states per rank, {report.world_size} ranks (16 bytes/param, ZeRO paper):",
    ]
    for stage, gb in report.model_state_gb_per_rank.items():
        lines.append(f"  {stage:<8}                      {gb:,.2f} GB")
    lines.append(f"logits per micro-batch          {report.logits_gb_bf16:,.2f} GB bf16, "
                 f"{report.logits_gb_fp32:,.2f} GB fp32 (seq {report.seq_len})")
    return "\n".join(lines)


def device_peak_tflops(override: float | None = None) -> float | None:
    """Dense bf16 peak of this device: the override, else the table entry for the CUDA device's name, else None
    (a CPU or an unknown accelerator: MFU is then not reported unless logging.peak_tflops is set)."""
    if override:
        return override
    if torch.cuda.is_available():
        return peak_tflops_for(torch.cuda.get_device_name())
    return None
