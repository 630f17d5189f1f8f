"""torchrun support: one process per GPU (NCCL) or per CPU worker (gloo). A single process needs none of it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistContext(rank, world, local, device)


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = ctx.device is not None and ctx.device.type == "cuda"
    if on_gpu:  # batch statistics over all GPUs, as one process with the global batch would have them
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [ctx.local_rank] if on_gpu else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when any rank says so (e.g. a stop request), so that all ranks stop at the same step."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        tdist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and tdist.is_initialized():
        tdist.destroy_process_group()
