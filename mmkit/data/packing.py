"""Packing: a micro-batch's samples laid end to end in rows of at most ``pack_length`` tokens.

Which samples share a row is decided inside one micro-batch only, so the samples of every optimizer step stay
exactly those :class:`mmkit.data.sampler.StepBatchSampler` gives, and packing draws no random number. A sample
is never split across rows. Rows are padded to the longest row of the micro-batch, so the row capacity matters,
not only the number of rows (:func:`pack_rows`): first-fit decreasing (FFD) at a capacity, found by binary
search, at which FFD still makes as few rows as at ``pack_length``, or FFD at the longest sample's length when
that has fewer positions -- so a packed micro-batch never has more positions than the padded one. Samples of
100, 60, 60, 60, 60 tokens with ``pack_length`` 256: rows 100+60 and 60+60+60 (width 180, 360 positions),
where FFD at 256 gives 100+60+60 and 60+60 (width 220, 440) and the padded batch has 500.

A packed micro-batch is exact: every sample sees only its own tokens, at its own positions, and trains on the
same targets as in a padded batch.

* ``position_ids`` restart at 0 at each sample (RoPE sees the positions of the unpacked sample).
* ``attention_mask`` is a 4D block-diagonal causal mask ``[rows, 1, T, T]``: query ``q`` may attend to key
  ``k`` iff ``k <= q`` and both belong to the same sample. transformers' ``create_causal_mask``
  (``masking_utils.py``) hands a 4D mask to the attention function as it is, so its form depends on the
  attention implementation: ``bool`` (True = attend) for SDPA, additive float (0 / dtype min) for eager,
  which adds the mask to the scores. (Restarting position_ids alone is not enough: transformers infers
  block-diagonal masking from position_ids only when there is no KV cache, and Llama and Qwen2 build one when
  ``use_cache`` is left unset, as the training step leaves it.)
* ``labels``: the first token of every sample is masked, so the last token of sample k is never trained to
  predict the first token of sample k+1 (in a padded batch the first label is dropped by the shift anyway).
* Images: ``pixel_values`` / ``image_sizes`` are reordered to the packed order (row by row, sample by sample),
  the order in which the model's merge meets the image tokens.

Padding: rows are padded on the right to the longest row of the micro-batch; pad tokens form their own block
(positions restarting at 0, labels -100), so no real token attends to them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100

# the attention implementations whose 4D mask form is known (see the module docstring)
MASK_FORMS = {"sdpa": "bool", "eager": "additive"}

__all__ = ["first_fit_decreasing", "pack_rows", "pack_samples", "block_causal_mask", "mask_form_for", "MASK_FORMS",
           "token_budget_groups"]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` total length: positions in ``lengths`` taken longest first (ties: the
    earlier position first), each into the first open bin it fits, else into a new bin. Deterministic."""
    rows: list[list[int]] = []
    totals: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit in a packed row of {capacity} (data.pack_length)")
        fit = next((r for r, total in enumerate(totals) if total + n <= capacity), None)
        if fit is None:
            rows.append([i])
            totals.append(n)
        else:
            rows[fit].append(i)
            totals[fit] += n
    return rows


def _slots(rows: list[list[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """(positions, width) of ``rows`` padded to the longest row."""
    width = max(sum(lengths[i] for i in row) for row in rows)
    return len(rows) * width, width


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """The rows of one micro-batch (positions in ``lengths``), each of at most ``pack_length`` tokens.

    ``fewest`` = FFD at ``pack_length``; a binary search finds a small capacity at which FFD still makes that
    few rows (FFD at the upper end always does). Of that packing and FFD at the longest sample's length (at most
    one row per sample, no row longer than the padded batch's), the one with fewer padded positions wins (then
    the narrower)."""
    fewest = len(first_fit_decreasing(lengths, pack_length))
    lo, hi = max(lengths) - 1, pack_length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(first_fit_decreasing(lengths, mid)) <= fewest:
            hi = mid
        else:
            lo = mid
    candidates = [first_fit_decreasing(lengths, hi), first_fit_decreasing(lengths, max(lengths))]
    return min(candidates, key=lambda rows: _slots(rows, lengths))


def block_causal_mask(seq_ids: torch.Tensor, form: str = "bool", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[rows, 1, T, T]`` mask from ``seq_ids [rows, T]`` (the sample each position belongs to): attend iff the
    key is not after the query and both have the same id. ``form``: ``bool`` or ``additive`` (0 / dtype min)."""
    T = seq_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if form == "bool":
        return allowed
    if form == "additive":
        return torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    raise ValueError(f"unknown mask form {form!r}; choices: bool, additive")


def mask_form_for(attn_implementation: str | None) -> str:
    """The 4D mask form packing passes for an LLM attention implementation (error for the others)."""
    if attn_implementation not in MASK_FORMS:
        raise ValueError(f"data.packing: the LLM's attention implementation {attn_implementation!r} is not "
                         f"supported with packing (supported: {', '.join(MASK_FORMS)}; set "
                         "model.llm.attn_implementation)")
    return MASK_FORMS[attn_implementation]


def token_budget_groups(lengths: Sequence[int], budget: int, pack_length: int | None = None) -> list[list[list[int]]]:
    """``data.batch_by_tokens``: one step's samples (their ``lengths``) cut into micro-batches of at most
    ``budget`` positions each. Returns, per micro-batch, its rows: lists of positions in ``lengths``.

    Without packing a row is one sample and a micro-batch costs ``rows x longest``; with ``pack_length`` the rows
    are first-fit-decreasing packs of the whole step at that capacity and a micro-batch costs ``rows x longest
    row``. Rows are taken longest first (ties: the earlier first) and a micro-batch grows while that cost stays
    within ``budget``. Deterministic; every sample lands in exactly one row."""
    if pack_length is None:
        rows = [[i] for i in range(len(lengths))]
    else:
        rows = first_fit_decreasing(lengths, pack_length)
    size = [sum(lengths[i] for i in row) for row in rows]
    if rows and max(size) > budget:
        raise ValueError(f"a row of {max(size)} tokens does not fit data.batch_by_tokens={budget}")
    groups: list[list[list[int]]] = []
    for r in sorted(range(len(rows)), key=lambda r: (-size[r], r)):
        # rows come longest first, so a group's first row is its widest: its cost is len(group) x that width
        if groups and (len(groups[-1]) + 1) * sum(lengths[i] for i in groups[-1][0]) <= budget:
            groups[-1].append(rows[r])
        else:
            groups.append([rows[r]])
    return groups


def pack_samples(samples: Sequence[dict], pack_length: int, pad_id: int, mask_form: str = "bool",
                 rows: list[list[int]] | None = None) -> dict[str, Any]:
    """Samples (``input_ids``, ``labels``, optional ``pixel_values`` / ``image_sizes``) -> one packed batch.
    ``rows``: which samples share a row (positions in ``samples``); default :func:`pack_rows`.

    Returns ``input_ids``, ``labels``, ``position_ids``, ``attention_mask`` (4D, see the module docstring),
    ``pixel_values`` / ``image_sizes`` in packed order when any sample has an image, and ``pack_layout``: per
    row, ``(k, start, length)`` of each sample it holds (``k``: the sample's position in ``samples``).
    """
    lengths = [len(s["input_ids"]) for s in samples]
    for s, n in zip(samples, lengths):
        if n > pack_length:  # the dataset fits samples to model.max_length, which the recipe keeps <= pack_length
            raise ValueError(f"sample {s.get('id')!r} has {n} tokens, more than data.pack_length={pack_length}")
    rows = pack_rows(lengths, pack_length) if rows is None else rows
    _, width = _slots(rows, lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_ids = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, a block of its own
    layout, pixel_values, image_sizes = [], [], []
    for r, row in enumerate(rows):
        start, placed = 0, []
        for k in row:
            s, n = samples[k], lengths[k]
            ids[r, start:start + n] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels[r, start:start + n] = torch.tensor(s["labels"], dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # never a target predicted from the previous sample's last token
            position_ids[r, start:start + n] = torch.arange(n)
            seq_ids[r, start:start + n] = k
            pixel_values.extend(s.get("pixel_values", []))
            image_sizes.extend(tuple(hw) for hw in s.get("image_sizes", []))
            placed.append((k, start, n))
            start += n
        position_ids[r, start:] = torch.arange(width - start)
        layout.append(placed)
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "position_ids": position_ids,
                             "attention_mask": block_causal_mask(seq_ids, mask_form), "pack_layout": layout}
    if pixel_values:
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = image_sizes
    return batch
