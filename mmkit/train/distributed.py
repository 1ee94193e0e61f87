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
        from torch.nn.parallel import DistributedDataParallel

        if getattr(model, "_mmkit_ddp", None) is None:
            model._mmkit_ddp = [DistributedDataParallel(model, find_unused_parameters=True)]
        return model._mmkit_ddp[0]
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if not getattr(model, "_mmkit_fsdp", False):
            for block in model.vision.blocks():
                fully_shard(block)
            for layer in model.llm.get_decoder().layers:
                fully_shard(layer)
            fully_shard(model)
            model._mmkit_fsdp = True
        return model
    raise ValueError(f"train.strategy: unknown strategy {strategy!r}")


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


def save_sharded(root, model, optimizer, scheduler, state, recipe, ctx: Context):
    """FSDP2: a sharded torch.distributed.checkpoint save that reloads on any world size."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from mmkit.train.checkpoint import checkpoint_name

    from mmkit.train.checkpoint import prune, rng_state_plain

    final = root / checkpoint_name(state["stage"], state["step"])
    staging = root / f".{final.name}.tmp-dcp"  # renamed into place once every rank has written its shard
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging / "dcp"))
    barrier(ctx)
    if ctx.is_main:
        torch.save({"scheduler": scheduler.state_dict()}, staging / "scheduler.pt")
        torch.save(rng_state_plain(), staging / "rng.pt")
        recipe.save(staging / "recipe.yaml")
        (staging / "state.json").write_text(json.dumps({**state, "world_size": ctx.world_size}, indent=1))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(staging, final)
        prune(root, recipe.train.keep_last)
    barrier(ctx)


def load_sharded(path, model, optimizer=None, scheduler=None) -> None:
    """Load a DCP checkpoint into a (possibly sharded) model, on any world size, or in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])


def full_state_dict(model, ctx: Context) -> dict | None:
    """The whole model's weights on rank 0 (gathered from FSDP shards when sharded)."""
    if not getattr(model, "_mmkit_fsdp", False):
        return model.state_dict() if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if ctx.is_main else None
