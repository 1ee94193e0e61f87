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

import errno
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mmkit.files import CorruptFileError, atomic_dir, read_json, reading_weights
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
    try:
        with atomic_dir(target, ours=lambda p: (p / "state.json").is_file(), overwrite=True) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            torch.save(rng_state_plain(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            recipe.save(tmp / "recipe.yaml")
    except (OSError, RuntimeError) as exc:
        raise _write_error(root, target, exc) from exc
    prune(root, keep_last)
    return target


def _write_error(root: Path, target: Path, exc: Exception) -> OSError:
    """A failed checkpoint write as one sentence: torch reports a full disk as ``basic_ios::clear: iostream
    error``, which names neither the cause nor the place."""
    free = shutil.disk_usage(root).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or "iostream error" in str(exc) or free < 64 * 2**20
    why = f"the disk is full ({free / 2**20:.0f} MiB free)" if full else str(exc).splitlines()[0]
    return OSError(getattr(exc, "errno", None) or (errno.ENOSPC if full else errno.EIO),
                   f"could not write checkpoint {target.name} under {root}: {why}; the previous checkpoints are "
                   "intact, free space (or point train.output_dir elsewhere) and rerun with --resume")


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


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when every file is there and readable (a disk that filled up
    or a copy that was cut short leaves truncated files under a complete-looking name)."""
    sharded = (path / "dcp").is_dir()
    needed = ["state.json", "rng.pt", "recipe.yaml"] + (
        ["scheduler.pt", "dcp/.metadata"] if sharded else ["model.safetensors", "optimizer.pt"])
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        read_json(path / "state.json")
        if not sharded:
            with reading_weights(path / "model.safetensors"), safe_open(str(path / "model.safetensors"), "pt") as fh:
                fh.keys()
        for name in ("optimizer.pt", "rng.pt", "scheduler.pt"):
            if (path / name).is_file():
                with zipfile.ZipFile(path / name) as zf:  # torch.save's format: check every member's CRC
                    if zf.testzip() is not None:
                        return f"{name} is corrupt"
    except (CorruptFileError, OSError, zipfile.BadZipFile) as exc:
        return str(exc)
    return None


def resumable_checkpoint(root: Path, log) -> Path | None:
    """The newest checkpoint under ``root`` that can be resumed from; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("--resume: skipping %s, it cannot be loaded (%s); trying the one before", path.name, problem)
    return None


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
        with reading_weights(path / "model.safetensors"):
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
    return read_json(path / "state.json")


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
