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
"""

from __future__ import annotations

from typing import Any, Sequence

from mmkit.data.dataset import IGNORE_INDEX, FailedSample, SkipCounter
from mmkit.data.packing import pack_samples

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "position_ids")

__all__ = ["Collator", "MODEL_KEYS"]


class Collator:
    def __init__(self, processor, padding_side: str = "right", max_examples: int = 3, pack_length: int | None = None,
                 mask_form: str = "bool"):
        self.processor = processor
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
            elif "labels" in s and all(label == IGNORE_INDEX for label in s["labels"]):
                # LlavaDataset never returns these; guard other datasets: an all-masked row only dilutes the loss
                skips.add("no_labels", "?", s.get("id"), "all labels masked", phase="load")
            else:
                kept.append(s)
        batch: dict[str, Any] = self._batch(kept) if kept else {}
        batch["ids"] = [s.get("id") for s in kept]
        batch["num_samples"] = len(kept)
        batch["num_skipped"] = len(samples) - len(kept)
        batch["num_indices"] = len(samples)
        batch["skips"] = skips.to_dict()
        batch["num_tokens"] = sum(len(s["input_ids"]) for s in kept)
        batch["num_slots"] = batch["input_ids"].numel() if kept else 0
        return batch

    def _batch(self, kept: list) -> dict:
        if self.pack_length is None:
            return self.processor.pad(kept, padding_side=self.padding_side)
        return pack_samples(kept, self.pack_length, self.processor.pad_token_id, self.mask_form)
