"""Samplers: LLaVA's length / modality grouping, and a plain seeded random order; both resumable mid-epoch.

``modality_length_grouped_indices`` reproduces ``llava.train.llava_trainer.get_modality_length_grouped_indices``
(and ``get_length_grouped_indices`` / ``split_to_even_chunks``) step by step:

* ``modality_lengths`` are positive for samples with an image and negative for text-only samples
  (:attr:`mmkit.data.dataset.LlavaDataset.modality_lengths`); zero is not allowed.
* If every sample has the same sign, the result is ``length_grouped_indices`` of all of them.
* Otherwise the image indices and the text indices are each length-grouped: a ``randperm`` of the group,
  cut into megabatches of ``world_size * batch_size``, each megabatch sorted by length (descending) and split
  into ``world_size`` chunks by the greedy ``split_to_even_chunks``. Both orders are cut into megabatches again;
  the **last** megabatch of each modality (full or not) is set aside, all other megabatches are shuffled
  together by a ``randperm``, and the two set-aside tails are merged, ``sorted`` (by index, as LLaVA does)
  and appended last. So every megabatch but the last holds one modality only.
* LLaVA's trainer passes ``world_size = processes * gradient_accumulation_steps``: a megabatch is one global
  batch, and each of its ``world_size`` chunks of ``batch_size`` is one micro-batch of one process.

Random numbers. LLaVA's inner calls pass ``generator=None`` (torch's global generator) and its trainer builds
the sampler with ``generator=None`` as well, so in training all three permutations come, in order, from one
stream: image ``randperm``, text ``randperm``, megabatch ``randperm``. Here they are drawn, in the same order,
from ``generator``; the result equals LLaVA's for a global generator in the same state
(``torch.manual_seed(s)`` there, ``torch.Generator().manual_seed(s)`` here).

Samplers (``torch.utils.data.Sampler``): :class:`LengthGroupedSampler` and :class:`ResumableRandomSampler`.
Epoch ``e`` uses a fresh ``torch.Generator().manual_seed(seed + e)``, so an order depends only on
``(seed, epoch, data)``. Call ``set_epoch(e)`` before each epoch (as with ``DistributedSampler``).
``state_dict(consumed)`` / ``load_state_dict(state)`` save and restore the position inside the epoch: after
loading, the next iteration yields exactly the indices that were not yet consumed. With DataLoader workers the
loader pulls indices ahead of the training step, so pass the number of indices the trainer has *consumed*
(``state_dict(consumed=...)``; the collate function reports ``num_indices`` per batch, failed samples
included); without it the number of indices yielded so far is used.

Several processes (``num_replicas > 1``): every rank computes the same global order; it is padded by repeating
its beginning to a multiple of ``num_replicas * batch_size`` and dealt out in micro-batches round-robin
(rank ``r`` takes micro-batches ``r, r + R, r + 2R, ...``), as accelerate's ``BatchSamplerShard`` does for the
HF Trainer. The random sampler deals out single indices (``DistributedSampler`` style). Positions in the state
are per rank.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = [
    "split_to_even_chunks",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "LengthGroupedSampler",
    "ResumableRandomSampler",
    "build_sampler",
]


def _randperm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """The only source of randomness here (a seam for hand-computed tests)."""
    return torch.randperm(n, generator=generator)


# --------------------------------------------------------------------------------------------- LLaVA's functions


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[float], num_chunks: int) -> list[list[int]]:
    """Split ``indices`` into ``num_chunks`` chunks of about equal total length (LLaVA's greedy rule).

    If ``len(indices)`` is not a multiple of ``num_chunks`` the split is round-robin (``indices[i::n]``).
    Otherwise each index goes to the chunk with the smallest total so far (first one on ties); a chunk that
    reached ``len(indices) // num_chunks`` entries is closed.
    """
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals: list[float] = [0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None = None) -> list[int]:
    """LLaVA's ``get_length_grouped_indices``: randperm, megabatches of ``world_size * batch_size`` sorted by
    length (descending, stable), each split by :func:`split_to_even_chunks` into ``world_size`` chunks."""
    indices = _randperm(len(lengths), generator)
    mb = world_size * batch_size
    megabatches = [indices[i:i + mb].tolist() for i in range(0, len(lengths), mb)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    chunked = [split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in chunked for chunk in m for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator | None = None) -> list[int]:
    """LLaVA's ``get_modality_length_grouped_indices`` (see the module docstring; all draws from ``generator``)."""
    if any(length == 0 for length in lengths):
        raise ValueError("modality lengths must be non-zero (positive: with image, negative: text-only)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    mm_indices = [i for i, length in enumerate(lengths) if length > 0]
    mm_lengths = [length for length in lengths if length > 0]
    lang_indices = [i for i, length in enumerate(lengths) if length < 0]
    lang_lengths = [-length for length in lengths if length < 0]

    mm_order = [mm_indices[i] for i in length_grouped_indices(mm_lengths, batch_size, world_size, generator)]
    lang_order = [lang_indices[i] for i in length_grouped_indices(lang_lengths, batch_size, world_size, generator)]
    mb = world_size * batch_size
    mm_mega = [mm_order[i:i + mb] for i in range(0, len(mm_order), mb)]
    lang_mega = [lang_order[i:i + mb] for i in range(0, len(lang_order), mb)]

    tail = mm_mega[-1] + lang_mega[-1]
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    perm = _randperm(len(megabatches), generator)
    megabatches = [megabatches[i] for i in perm]
    if tail:
        megabatches.append(sorted(tail))
    return [i for m in megabatches for i in m]


# --------------------------------------------------------------------------------------------- samplers


class _ResumableSampler(Sampler[int]):
    """Shared epoch / position / sharding logic. Subclasses implement ``_global_order(generator)`` and
    ``_shard(order)``."""

    kind = "base"

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.n = int(num_samples)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self._start = 0  # first position of this rank's order to yield (resume)
        self._yielded = 0  # absolute position reached by the current iteration

    # -- order
    def _global_order(self, generator: torch.Generator) -> list[int]:
        raise NotImplementedError

    def _shard(self, order: list[int]) -> list[int]:
        raise NotImplementedError

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's full index order of ``epoch`` (default: the current epoch)."""
        g = torch.Generator()
        g.manual_seed(self.seed + (self.epoch if epoch is None else int(epoch)))
        order = self._global_order(g)
        return self._shard(order) if self.num_replicas > 1 else order

    def _per_rank(self) -> int:
        raise NotImplementedError

    # -- Sampler API
    def __iter__(self) -> Iterator[int]:
        order = self.order()
        start = self._start
        self._yielded = start
        for pos in range(start, len(order)):
            self._yielded = pos + 1
            yield order[pos]
        self._start = 0  # a finished pass: the next one (e.g. after set_epoch) starts at the beginning

    def __len__(self) -> int:
        """Indices the next iteration yields (the rest of the epoch after a resume)."""
        return self._per_rank() - self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A position loaded for this same epoch is kept; another epoch starts at 0."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = 0
            self._yielded = 0

    # -- state
    def state_dict(self, consumed: int | None = None) -> dict:
        """``{"epoch", "position", ...}``. ``consumed``: indices of this epoch (this rank) the trainer has used,
        counted from the start of the epoch; default: the number yielded so far (exact without workers)."""
        position = self._yielded if consumed is None else int(consumed)
        if not 0 <= position <= self._per_rank():
            raise ValueError(f"position {position} outside the epoch (0..{self._per_rank()})")
        return {"kind": self.kind, "epoch": self.epoch, "position": position, "seed": self.seed,
                "num_samples": self.n, "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields the rest of ``state["epoch"]`` from ``state["position"]``."""
        for key, mine in (("kind", self.kind), ("seed", self.seed), ("num_samples", self.n),
                          ("num_replicas", self.num_replicas)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state does not match: {key}={state[key]!r} saved, {mine!r} now "
                                 "(resuming with different data, seed or number of processes?)")
        position = int(state.get("position", 0))
        if not 0 <= position <= self._per_rank():
            raise ValueError(f"sampler state position {position} outside the epoch (0..{self._per_rank()})")
        self.epoch = int(state.get("epoch", 0))
        self._start = position
        self._yielded = position


class LengthGroupedSampler(_ResumableSampler):
    """LLaVA's ``LengthGroupedSampler`` (``group_by_modality=True``: ``--group_by_modality_length``).

    ``lengths``: the dataset's ``modality_lengths`` (or ``lengths`` with ``group_by_modality=False``).
    ``batch_size``: per-process micro-batch. ``world_size``: LLaVA's grouping factor, i.e.
    ``num_processes * gradient_accumulation_steps`` (one megabatch = one global batch); defaults to
    ``num_replicas``. ``num_replicas`` / ``rank``: actual sharding across processes (see the module docstring).
    """

    kind = "length_grouped"

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int | None = None, *,
                 group_by_modality: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(len(lengths), seed, num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = int(batch_size)
        self.world_size = int(world_size if world_size is not None else num_replicas)
        self.group_by_modality = group_by_modality
        if not group_by_modality and any(x < 0 for x in self.lengths):
            raise ValueError("negative lengths need group_by_modality=True (pass dataset.lengths otherwise)")

    def _global_order(self, generator: torch.Generator) -> list[int]:
        if self.n == 0:
            return []
        fn = modality_length_grouped_indices if self.group_by_modality else length_grouped_indices
        return fn(self.lengths, self.batch_size, self.world_size, generator)

    def _per_rank(self) -> int:
        if self.num_replicas == 1:
            return self.n
        step = self.batch_size * self.num_replicas
        return math.ceil(self.n / step) * self.batch_size if self.n else 0

    def _shard(self, order: list[int]) -> list[int]:
        step = self.batch_size * self.num_replicas
        total = math.ceil(len(order) / step) * step
        padded = order + [order[i % len(order)] for i in range(total - len(order))] if order else []
        out: list[int] = []
        for b in range(self.rank, total // self.batch_size, self.num_replicas):
            out.extend(padded[b * self.batch_size:(b + 1) * self.batch_size])
        return out


class ResumableRandomSampler(_ResumableSampler):
    """A seeded random order (``randperm`` of epoch ``seed + epoch``) with the same resume API.

    ``data``: a dataset (its ``len``) or a number of samples. Several processes: the permutation is padded by
    repeating its beginning to a multiple of ``num_replicas`` and rank ``r`` takes ``order[r::num_replicas]``.
    """

    kind = "random"

    def __init__(self, data, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(data if isinstance(data, int) else len(data), seed, num_replicas, rank)

    def _global_order(self, generator: torch.Generator) -> list[int]:
        return _randperm(self.n, generator).tolist()

    def _per_rank(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def _shard(self, order: list[int]) -> list[int]:
        total = self._per_rank() * self.num_replicas
        padded = order + [order[i % len(order)] for i in range(total - len(order))] if order else []
        return padded[self.rank::self.num_replicas]


def build_sampler(dataset, *, batch_size: int, group_by_modality_length: bool = False, grad_accum: int = 1,
                  seed: int = 0, num_replicas: int = 1, rank: int = 0) -> _ResumableSampler:
    """The training sampler of a stage: LLaVA's modality grouping (``data.group_by_modality_length``, with
    ``world_size = num_replicas * grad_accum``) or a seeded random order."""
    if group_by_modality_length:
        return LengthGroupedSampler(dataset.modality_lengths, batch_size, num_replicas * grad_accum,
                                    group_by_modality=True, seed=seed, num_replicas=num_replicas, rank=rank)
    return ResumableRandomSampler(len(dataset), seed=seed, num_replicas=num_replicas, rank=rank)
