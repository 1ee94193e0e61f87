"""torchrun integration: process group, DDP / FSDP2 wrapping, reductions.

``torchrun --nproc_per_node N -m mmkit.train RECIPE train.strategy=ddp|fsdp``. On CPU the
backend is gloo, on CUDA nccl. FSDP2 (``fully_shard``) shards every decoder layer and vision
block, then the root; its checkpoints are sharded ``torch.distributed.checkpoint`` saves.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> Context:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return context()


def context() -> Context:
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Context()


def all_reduce_sum(value: float | int, ctx: Context):
    if ctx.world_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def all_reduce_max(value: float | int, ctx: Context):
    if ctx.world_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def all_reduce_tensor_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The elementwise sum of ``t`` over ranks (a CPU tensor; moved to the GPU and back under nccl)."""
    if ctx.world_size == 1:
        return t
    on = t.to(f"cuda:{ctx.local_rank}") if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(on)
    return on.to(t.device)


def even_micro_batches(batches: list, ctx: Context) -> tuple[list, list[float]]:
    """``batches`` and a weight for each, lengthened so that every rank runs as many micro-batches as the rank
    with the most (``data.batch_by_tokens`` cuts the ranks' shares of a step by tokens, so their counts may
    differ): DDP broadcasts buffers in each forward and FSDP gathers parameters in each forward and reduces
    gradients in each backward, so uneven counts would hang. The extra ones repeat the last micro-batch at
    weight 0: their loss times 0 adds exact zeros to the gradients."""
    weights = [1.0] * len(batches)
    if ctx.world_size == 1:
        return batches, weights
    most = int(all_reduce_max(len(batches), ctx))
    if most > len(batches) and not batches:
        raise ValueError(f"rank {ctx.rank}: no sample of this step's share could be loaded, so it has no "
                         "micro-batch to run beside the other ranks")
    extra = most - len(batches)
    return batches + batches[-1:] * extra, weights + [0.0] * extra


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    """Leave the process group cleanly (exiting with live gloo threads can abort the process)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model, strategy: str, ctx: Context):
    """The module the loop calls: the model itself, a DDP wrapper, or the FSDP2-sharded model."""
    if ctx.world_size == 1 or strategy == "single":
        return model
    if strategy == "ddp":
        if getattr(model, "_mmkit_ddp", None) is None:
            model._mmkit_ddp = [DistributedDataParallel(model, find_unused_parameters=True)]
        return model._mmkit_ddp[0]
    if strategy == "fsdp":
        if not getattr(model, "_mmkit_fsdp", False):
            for block in model.vision.blocks():
                fully_shard(block)
            for layer in model.llm.get_decoder().layers:
                fully_shard(layer)
            fully_shard(model)
            model._mmkit_fsdp = True
        return model
    raise ValueError(f"train.strategy: unknown strategy {strategy!r}")


def reshard(model) -> None:
    """Put FSDP2-sharded modules back to their sharded parameters. A forward without a backward (under
    ``torch.no_grad()``) leaves the root module's parameters unsharded (FSDP2 keeps them for the backward), and an
    optimizer built then would hold the unsharded tensors instead of the sharded ones."""
    if getattr(model, "_mmkit_fsdp", False):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def no_sync(module, skip: bool):
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(train_model, model, max_norm: float):
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def full_state_dict(model, ctx: Context) -> dict | None:
    """The whole model's weights on rank 0 (gathered from FSDP shards when sharded)."""
    if not getattr(model, "_mmkit_fsdp", False):
        return model.state_dict() if ctx.is_main else None
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if ctx.is_main else None
