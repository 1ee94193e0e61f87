"""Collate function: drop samples that failed to load, count them, pad the rest on the right.

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
processes). Sequences are not truncated here: the dataset already fitted them to ``max_length`` after image
expansion (cutting ids here could split an image's tokens).
"""

from __future__ import annotations

from typing import Any, Sequence

from mmkit.data.dataset import IGNORE_INDEX, FailedSample, SkipCounter

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_sizes")

__all__ = ["Collator", "MODEL_KEYS"]


class Collator:
    def __init__(self, processor, padding_side: str = "right", max_examples: int = 3):
        self.processor = processor
        self.padding_side = padding_side
        self.max_examples = max_examples

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
        batch: dict[str, Any] = self.processor.pad(kept, padding_side=self.padding_side) if kept else {}
        batch["ids"] = [s.get("id") for s in kept]
        batch["num_samples"] = len(kept)
        batch["num_skipped"] = len(samples) - len(kept)
        batch["num_indices"] = len(samples)
        batch["skips"] = skips.to_dict()
        return batch
