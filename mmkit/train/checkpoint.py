"""Training checkpoints: atomic, keep-last-N, everything needed for a bit-identical resume.

    RUN/checkpoints/stage0-step000500/
        model.safetensors    every weight of the model (LoRA adapters included)
        optimizer.pt         optimizer + scheduler state (loaded with weights_only=True)
        rng.pt               torch / numpy / python RNG states
        state.json           stage, step, sampler position, skip counts, loss history
        recipe.yaml          the resolved recipe

A directory appears under its final name only after every file is written and fsynced, so a
kill during a save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mmkit.files import atomic_dir
from mmkit.train import distributed as dist_utils

NAME = re.compile(r"^stage(\d+)-step(\d+)$")


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:06d}"


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(root: Path, model, optimizer, scheduler, state: dict, recipe, keep_last: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint_name(state["stage"], state["step"])
    with atomic_dir(target, marker="state.json") as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state_plain(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        recipe.save(tmp / "recipe.yaml")
    prune(root, keep_last)
    return target


def rng_state_plain() -> dict:
    """RNG states as tensors and plain values (loadable with weights_only=True)."""
    rng = rng_state()
    return {"torch": rng["torch"], "numpy": _np_state_to_plain(rng["numpy"]), "python": _py_state(rng["python"])}


def _np_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _np_state_from_plain(plain):
    name, keys, pos, has_gauss, cached = plain
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _py_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(tuple(map(int, m.groups())), p) for p in root.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    for stale in root.glob(".*.tmp-*"):  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict:
    if (path / "dcp").is_dir():  # a sharded FSDP save: reloads on any world size
        load_sharded(path, model, optimizer, scheduler)
        optimizer = None
    else:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not fit the model: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
    if optimizer is not None:
        states = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    set_rng_state({"torch": rng["torch"], "numpy": _np_state_from_plain(rng["numpy"]),
                   "python": (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])})
    return json.loads((path / "state.json").read_text())


def save_sharded(root, model, optimizer, scheduler, state, recipe, ctx: dist_utils.Context):
    """FSDP2: a sharded torch.distributed.checkpoint save that reloads on any world size."""
    final = root / checkpoint_name(state["stage"], state["step"])
    staging = root / f".{final.name}.tmp-dcp"  # renamed into place once every rank has written its shard
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging / "dcp"))
    dist_utils.barrier(ctx)
    if ctx.is_main:
        torch.save({"scheduler": scheduler.state_dict()}, staging / "scheduler.pt")
        torch.save(rng_state_plain(), staging / "rng.pt")
        recipe.save(staging / "recipe.yaml")
        (staging / "state.json").write_text(json.dumps({**state, "world_size": ctx.world_size}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        prune(root, recipe.train.keep_last)
    dist_utils.barrier(ctx)


def load_sharded(path, model, optimizer=None, scheduler=None) -> None:
    """Load a DCP checkpoint into a (possibly sharded) model, on any world size, or in one process."""
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
