"""Training batches through ``torch.utils.data.DataLoader``: a batch sampler's micro-batches, collated in worker
processes (or in the calling process with ``num_workers=0``).

The batch sampler (:class:`mmkit.data.sampler.StepBatchSampler`) decides which indices make each micro-batch and
in which order; the DataLoader returns the collated micro-batches in exactly that order whatever the number of
workers (it reorders out-of-order worker results), so the batches -- hence the losses -- do not depend on
``num_workers``. Resume = a new loader over a sampler built with the checkpoint's ``start_step``; whatever the
workers had prefetched before a kill is simply loaded again.

Randomness: loading draws no random numbers (images are decoded and tokenized, nothing is augmented). The
DataLoader still draws one number per iterator for its workers' seeds (``base_seed``); it draws it from a
generator of its own here, so building a loader never moves torch's global RNG, which a checkpoint saves and a
resumed run restores.

Worker processes use the platform's default start method (``fork`` on Linux) and never touch CUDA: samples are
decoded and padded on the CPU, and the training process moves them to the device. ``pin_memory`` is for CUDA
only (pinned host memory makes the copy to the GPU asynchronous; it means nothing on CPU).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["available_cpus", "default_num_workers", "resolve_num_workers", "build_loader"]

MAX_DEFAULT_WORKERS = 4  # what LLaVA's training scripts use (--dataloader_num_workers 4)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers(world_size: int, cpus: int | None = None) -> int:
    """``min(4, max(0, cpus // world_size - 1))``: the CPUs are shared by the ``world_size`` training processes
    of this machine, and each keeps one for itself; 0 (load in the training process) when there is none to spare."""
    cpus = available_cpus() if cpus is None else cpus
    return min(MAX_DEFAULT_WORKERS, max(0, cpus // max(world_size, 1) - 1))


def resolve_num_workers(num_workers: int | None, world_size: int) -> int:
    """``data.num_workers``: ``None`` = :func:`default_num_workers`, else the number itself."""
    return default_num_workers(world_size) if num_workers is None else int(num_workers)


def build_loader(dataset: Dataset, batch_sampler: Sampler, collate_fn, num_workers: int, prefetch_factor: int = 2,
                 pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader yielding ``collate_fn([dataset[i] for i in idx])`` for each ``idx`` of ``batch_sampler``.

    ``prefetch_factor``: micro-batches each worker loads ahead (ignored with ``num_workers=0``). ``seed`` seeds
    the loader's own generator (the workers' ``torch.initial_seed()``), never the global one.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers > 0:
        # HF tokenizers' thread pool does not survive a fork (it disables itself in the child with a warning
        # when it was used before); off from the start unless the user chose otherwise
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      # the loader is iterated once (its sampler covers every remaining step of the stage)
                      persistent_workers=False,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(int(seed)))
