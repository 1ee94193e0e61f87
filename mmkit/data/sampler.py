"""Training order: LLaVA's length / modality grouping or a seeded random order, cut into this rank's micro-batches.

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

Training order (:class:`StepBatchSampler`, a batch sampler: it yields micro-batches, lists of indices).
Epoch ``e`` has one global order drawn from a fresh ``torch.Generator().manual_seed(seed + e)`` (LLaVA's modality
grouping with ``world_size = processes * accumulation``, or a plain ``randperm``), so an order depends only on
``(seed, epoch, data)``. The epoch is cut into ``max(1, len // G)`` optimizer steps (``G``: the global batch; a
remainder smaller than one global batch is dropped): step ``s`` of the epoch uses ``order[s*G:(s+1)*G]``, rank ``r``
of ``R`` takes the contiguous share ``[r*G/R:(r+1)*G/R]`` of it, split into ``accum = G / (R * per_device)``
micro-batches. Every rank computes the same global order, so the ranks together cover each global batch exactly
once, and the samples of a step (hence its token-mean loss) do not depend on ``R``. Resume = construct the
sampler with ``start_step``: it yields exactly the micro-batches of the steps not yet taken.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = [
    "split_to_even_chunks",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "StepBatchSampler",
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


# --------------------------------------------------------------------------------------------- training order


class StepBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for optimizer steps ``start_step .. total_steps - 1`` (see the module docstring).

    ``data``: the number of samples, or the dataset's ``modality_lengths`` (needed with
    ``group_by_modality_length``; LLaVA's ``--group_by_modality_length``). Each optimizer step is ``accum``
    consecutive micro-batches of ``per_device_batch`` indices. ``total_steps`` defaults to one epoch.
    """

    def __init__(self, data: int | Sequence[int], global_batch: int, per_device_batch: int, world: int = 1,
                 rank: int = 0, seed: int = 0, group_by_modality_length: bool = False, start_step: int = 0,
                 total_steps: int | None = None):
        if isinstance(data, int):
            if group_by_modality_length:
                raise ValueError("group_by_modality_length needs the dataset's modality_lengths, not a length")
            self.lengths: list[int] | None = None
            self.n = data
        else:
            self.lengths = [int(x) for x in data]
            self.n = len(self.lengths)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if per_device_batch < 1 or global_batch % (per_device_batch * world):
            raise ValueError(f"global batch {global_batch} is not a multiple of per-device batch {per_device_batch} "
                             f"x {world} process(es)")
        if self.n < global_batch:
            raise ValueError(f"{self.n} samples, fewer than one global batch ({global_batch})")
        self.global_batch = int(global_batch)
        self.per_device = int(per_device_batch)
        self.world = int(world)
        self.rank = int(rank)
        self.seed = int(seed)
        self.group_by_modality_length = bool(group_by_modality_length)
        self.accum = self.global_batch // (self.per_device * self.world)
        self.steps_per_epoch = max(1, self.n // self.global_batch)
        self.total_steps = self.steps_per_epoch if total_steps is None else int(total_steps)
        if not 0 <= start_step <= self.total_steps:
            raise ValueError(f"start_step {start_step} outside 0..{self.total_steps}")
        self.start_step = int(start_step)

    def epoch_order(self, epoch: int) -> list[int]:
        """The global sample order of ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.group_by_modality_length:
            return list(modality_length_grouped_indices(self.lengths, self.per_device, self.world * self.accum,
                                                        generator=g))
        return _randperm(self.n, g).tolist()

    def step_micro_batches(self, order: list[int], step_in_epoch: int) -> list[list[int]]:
        """This rank's ``accum`` micro-batches of step ``step_in_epoch`` of an epoch whose order is ``order``."""
        G = self.global_batch
        chunk = order[step_in_epoch * G:(step_in_epoch + 1) * G]
        share = len(chunk) // self.world
        mine = chunk[self.rank * share:(self.rank + 1) * share]
        b = self.per_device
        return [mine[i * b:(i + 1) * b] for i in range(self.accum)]

    def __iter__(self) -> Iterator[list[int]]:
        order_epoch, order = None, None
        for step in range(self.start_step, self.total_steps):
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            yield from self.step_micro_batches(order, in_epoch)

    def __len__(self) -> int:
        """Micro-batches the iteration yields: ``accum`` per remaining step."""
        return (self.total_steps - self.start_step) * self.accum
