"""Collate function: drop samples that failed to load, count them, pad (or pack) the rest on the right.

    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2, collate_fn=Collator(processor))
    for batch in loader:
        skips.merge(batch["skips"])          # SkipCounter kept by the trainer, printed with skips.summary()
        if batch["num_samples"] == 0:        # every sample of this batch failed: nothing to train on
            continue
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch})

A batch is ``processor.pad(kept, padding_side="right")`` -- ``input_ids``, ``attention_mask``, ``labels``
(-100 on padding), ``pixel_values`` (list of ``[views, 3, S, S]``, in order of appearance) and ``image_sizes``
when any sample has an image -- plus bookkeeping: ``ids`` (record ids of the kept samples), ``num_samples``,
``num_skipped``, ``num_indices`` (samples drawn, failed ones included: what a resumable sampler counts as
consumed) and ``skips`` (``SkipCounter.to_dict()`` of this batch's failures, a plain dict so it crosses worker
processes), ``num_tokens`` (tokens of the kept samples) and ``num_slots`` (positions of the padded tensor, so
``1 - num_tokens / num_slots`` is the batch's padding share). Sequences are not truncated here: the dataset
already fitted them to ``max_length`` after image expansion (cutting ids here could split an image's tokens).

With ``pack_length``, the kept samples are packed into rows of at most that many tokens instead
(:func:`mmkit.data.packing.pack_samples`: ``position_ids``, a 4D block-diagonal causal ``attention_mask`` of the
form ``mask_form``, images in packed order, and ``pack_layout``).

With ``pairs=True`` (a DPO stage) every sample is a preference sample (``rejected_input_ids`` /
``rejected_labels``, see :mod:`mmkit.data.records`) and the batch holds ``2P`` rows: the ``P`` chosen sequences,
then the ``P`` rejected ones in the same order, each with its own copy of the pair's images, so one forward
scores both; ``num_pairs`` is ``P``. With ``pack_length`` too, those ``2P`` sequences (chosen then rejected, each
with its pair's images) are packed instead, ``pack_layout`` giving each one's place (token budgets are not used
with pairs). When the samples carry
``index`` (:class:`mmkit.data.dataset.IndexedDataset`), ``pair_index`` is the ``[P]`` tensor of those indices.
Without ``pairs`` a preference sample trains as its chosen conversation.

With ``token_budget`` (``data.batch_by_tokens``) the samples given are a whole step of one process, and the
batch holds ``micro_batches``: a list of such batches (tensors only, no bookkeeping), each of at most
``token_budget`` positions (:func:`mmkit.data.packing.token_budget_groups`); the bookkeeping covers them all.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmkit.data.dataset import IGNORE_INDEX, FailedSample, SkipCounter
from mmkit.data.packing import pack_samples, token_budget_groups

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "position_ids",
              "pixel_values_videos")

__all__ = ["Collator", "MODEL_KEYS"]


class Collator:
    def __init__(self, processor, padding_side: str = "right", max_examples: int = 3, pack_length: int | None = None,
                 mask_form: str = "bool", token_budget: int | None = None, pairs: bool = False):
        if pairs and token_budget is not None:
            raise ValueError("preference pairs are not cut by a token budget (data.batch_by_tokens)")
        self.pairs = pairs
        self.processor = processor
        self.token_budget = token_budget
        self.padding_side = padding_side
        self.max_examples = max_examples
        self.pack_length = pack_length
        self.mask_form = mask_form

    def __call__(self, samples: Sequence[Any]) -> dict:
        skips = SkipCounter(self.max_examples)
        kept = []
        for s in samples:
            if isinstance(s, FailedSample):
                skips.add(s.reason, s.file, s.record_id, s.detail, phase="load")
            elif self.pairs and "rejected_input_ids" not in s:
                skips.add("structure", "?", s.get("id"), "not a preference record (chosen / rejected)", phase="load")
            elif "labels" in s and all(label == IGNORE_INDEX for label in s["labels"]):
                # LlavaDataset never returns these; guard other datasets: an all-masked row only dilutes the loss
                skips.add("no_labels", "?", s.get("id"), "all labels masked", phase="load")
            else:
                kept.append(s)
        if self.pairs:
            batch: dict[str, Any] = self._pair_batch(kept) if kept else {}
            slots = batch["input_ids"].numel() if kept else 0
            batch["num_pairs"] = len(kept)
            if kept and all("index" in s for s in kept):
                batch["pair_index"] = torch.tensor([s["index"] for s in kept], dtype=torch.long)
        elif self.token_budget is None:
            batch = self._batch(kept) if kept else {}
            slots = batch["input_ids"].numel() if kept else 0
        else:
            batch = {"micro_batches": self._micro_batches(kept)}
            slots = sum(b["input_ids"].numel() for b in batch["micro_batches"])
        batch["ids"] = [s.get("id") for s in kept]
        batch["num_samples"] = len(kept)
        batch["num_skipped"] = len(samples) - len(kept)
        batch["num_indices"] = len(samples)
        batch["skips"] = skips.to_dict()
        batch["num_tokens"] = sum(len(s["input_ids"]) + len(s.get("rejected_input_ids", ())) * self.pairs
                                  for s in kept)
        batch["num_slots"] = slots
        return batch

    def _pair_batch(self, kept: list) -> dict:
        keys = ("pixel_values", "image_sizes")
        chosen = [{"input_ids": s["input_ids"], "labels": s["labels"], **{k: s[k] for k in keys if k in s}}
                  for s in kept]
        rejected = [{"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"],
                     **{k: s[k] for k in keys if k in s}} for s in kept]
        if self.pack_length is None:
            return self.processor.pad(chosen + rejected, padding_side=self.padding_side)
        # sequences k < P chosen, k >= P rejected (pack_layout's k), each pair's images with both of its sequences
        return pack_samples(chosen + rejected, self.pack_length, self.processor.pad_token_id, self.mask_form)

    def _batch(self, kept: list, rows: list[list[int]] | None = None) -> dict:
        if self.pack_length is None or any(s.get("pixel_values_videos") for s in kept):
            # packing keeps images only (mmkit.data.packing): a batch with a video is padded instead
            return self.processor.pad(kept, padding_side=self.padding_side)
        return pack_samples(kept, self.pack_length, self.processor.pad_token_id, self.mask_form, rows=rows)

    def _micro_batches(self, kept: list) -> list[dict]:
        """``kept`` cut into micro-batches of at most ``token_budget`` positions, each padded or packed."""
        groups = token_budget_groups([len(s["input_ids"]) for s in kept], self.token_budget, self.pack_length)
        out = []
        for group in groups:
            order = [i for row in group for i in row]
            subset = [kept[i] for i in order]
            if self.pack_length is None:
                out.append(self._batch(subset))
            else:  # the rows found for the whole step, renumbered as positions in ``subset``
                at = {i: k for k, i in enumerate(order)}
                out.append(self._batch(subset, rows=[[at[i] for i in row] for row in group]))
        return out
