"""Process groups and FSDP2 sharding (`torch.distributed.fsdp.fully_shard`).

Launch with torchrun (`torchrun --nproc-per-node 8 -m services.cli train teacher ...`); the CLI
reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and calls `init_distributed`. CPU runs use gloo,
CUDA runs nccl. Sharding: one FSDP unit per transformer block (its `in_context_forward` is the
hooked method, see `training.models.TrainDiT`) plus the root (embeddings, output head), whose
`embed_text` is hooked too. Mixed precision: fp32 master weights sharded, bf16 compute
(`param_dtype`), fp32 gradient reduction. Activation checkpointing is the DiT's own per-block
`gradient_checkpointing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from .config import ParallelConfig
from .models import TrainDiT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def mean(self, value: torch.Tensor | float) -> float:
        """Average of a scalar over ranks (SUM + divide: gloo has no AVG)."""
        t = torch.as_tensor(value, dtype=torch.float64).detach().to("cpu" if self.device.type == "cpu" else self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return float(t)


def init_distributed(device: str, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> DistInfo:
    """Join the default process group (env:// rendezvous, as torchrun sets it) when world_size > 1."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    mesh = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        mesh = init_device_mesh(dev.type, (world_size,))
    return DistInfo(rank, world_size, local_rank, dev, mesh)


def use_fsdp(cfg: ParallelConfig, info: DistInfo) -> bool:
    if cfg.fsdp == "on":
        return True
    if cfg.fsdp == "off":
        if info.distributed:
            raise ValueError("parallel.fsdp='off' with several ranks: data parallelism here is FSDP")
        return False
    return info.distributed


def shard_model(model: TrainDiT, cfg: ParallelConfig, info: DistInfo) -> TrainDiT:
    """Shard per block + root with FSDP2, in place. Params become DTensors: build optimizers after."""
    if info.mesh is None and not dist.is_initialized():  # FSDP forced on one process: an in-process group
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = info.mesh if info.mesh is not None else init_device_mesh(info.device.type, (1,))
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype], cast_forward_inputs=False
    )
    for block in model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        register_fsdp_forward_method(block, "in_context_forward")
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    register_fsdp_forward_method(model, "embed_text")
    model.gradient_checkpointing = cfg.activation_checkpointing
    return model


def prepare_model(model: TrainDiT, cfg: ParallelConfig, info: DistInfo) -> TrainDiT:
    """Move to the device and shard (FSDP) or not; sets activation checkpointing either way."""
    model = model.to(info.device)
    if use_fsdp(cfg, info):
        return shard_model(model, cfg, info)
    model.gradient_checkpointing = cfg.activation_checkpointing
    return model


def autocast(cfg: ParallelConfig, info: DistInfo, fsdp: bool):
    """bf16 autocast for unsharded runs that ask for bf16 compute (FSDP casts params itself)."""
    enabled = not fsdp and cfg.param_dtype == "bfloat16"
    return torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=enabled)


def compute_dtype(cfg: ParallelConfig) -> torch.dtype:
    return DTYPES[cfg.param_dtype]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
