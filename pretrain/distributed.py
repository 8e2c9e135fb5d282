"""Process-group setup and the DeepSpeed engine. Everything about parallelism lives here, not in the model.

Works under `torchrun` (one or many nodes), under the `deepspeed` launcher (which passes --local_rank), and as
a plain single process (the variables torchrun would set are filled in, so DeepSpeed does not try MPI).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fuxi.pretrain.config import TrainConfig


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> DistributedContext:
    if "WORLD_SIZE" not in os.environ:  # a plain `python -m ...` run: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        # Plain gloo instead of JIT-compiling DeepSpeed's shared-memory comm op (~35 s) on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or ("nccl" if use_cuda else "gloo"), verbose=False)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def deepspeed_config(cfg: TrainConfig, world_size: int, global_batch: int) -> dict:
    par = cfg.parallelism
    grad_accum = global_batch // (par.micro_batch * world_size)
    zero = {"stage": par.zero_stage, "contiguous_gradients": True, "overlap_comm": par.overlap_comm,
            "reduce_bucket_size": par.reduce_bucket_size, "allgather_bucket_size": par.allgather_bucket_size}
    if par.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": par.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": par.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": par.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch AdamW (no JIT build). Matrices decay; biases, norm weights and 1-D tensors do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps)


def build_engine(model: torch.nn.Module, cfg: TrainConfig, ctx: DistributedContext, global_batch: int):
    """The DeepSpeed engine. It reads checkpoints through `WeightsOnlyCheckpointReader`: resuming never unpickles
    anything but tensors and DeepSpeed's data classes (DeepSpeed's own reader would run a crafted file)."""
    import deepspeed

    from fuxi.checkpoints.deepspeed_checkpoint import WeightsOnlyCheckpointReader

    optimizer = build_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                           config=deepspeed_config(cfg, ctx.world_size, global_batch))
    engine.checkpoint_engine = WeightsOnlyCheckpointReader(engine.checkpoint_engine)
    return engine


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank: one collective (every rank must call it)."""
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
