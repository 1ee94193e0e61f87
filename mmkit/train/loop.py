"""The training loop: stages in order, gradient accumulation, checkpoints, exact resume.

Batches are cut from one global order per epoch (a seeded permutation, or LLaVA's
modality-length grouping): optimizer step ``s`` uses samples ``order[s*G:(s+1)*G]`` (G = global
batch), rank ``r`` takes its contiguous share and splits it into micro-batches. The loss of a
step is the sum of token losses divided by the number of supervised tokens in the whole global
batch, so 1 process, N processes and any accumulation give the same gradients.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mmkit.compat import enable_activation_checkpointing
from mmkit.data.collate import MODEL_KEYS
from mmkit.data.dataset import SkipCounter
from mmkit.train import distributed as dist_utils
from mmkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mmkit.train.stages import (
    check_stage,
    cosine_with_warmup,
    estimate_memory_bytes,
    grad_accum_steps,
    param_groups,
    plan,
    set_trainable,
    total_steps,
)

log = logging.getLogger("mmkit.train")


@dataclass
class StageResult:
    name: str
    steps: int
    losses: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0


def epoch_order(dataset, stage_data, epoch: int, seed: int, per_device: int, world: int, accum: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    if stage_data.group_by_modality_length:
        from mmkit.data.sampler import modality_length_grouped_indices

        return list(modality_length_grouped_indices(dataset.modality_lengths, per_device, world * accum, generator=g))
    return torch.randperm(len(dataset), generator=g).tolist()


class Trainer:
    def __init__(self, model, recipe, run_dir: Path, resume: bool = False):
        self.model = model
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.ctx = dist_utils.context()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        from mmkit.eval.hook import EvalHook

        self.eval_hook = EvalHook.from_recipe(recipe, self.run_dir)  # None unless train.eval_every > 0

    # ---------------------------------------------------------------- data

    def stage_dataset(self, index: int, stage):
        from mmkit.data.dataset import build_dataset

        data_cfg = stage.data or self.recipe.data
        template = stage.template or self.model.template
        def make():
            return build_dataset(data_cfg, self.model.processor, template=template,
                                 max_length=self.recipe.model.max_length, base_dir=".",
                                 data_dir=self.run_dir / "data", demo=self.recipe.demo, seed=self.recipe.train.seed)

        # rank 0 first: it may generate the demo data that the other ranks then read
        dataset = make() if self.ctx.is_main else None
        dist_utils.barrier(self.ctx)
        if dataset is None:
            dataset = make()
        if self.ctx.is_main and dataset.skips.total:
            log.warning("stage %d: %s", index, dataset.skips.summary())
        return data_cfg, dataset

    def micro_batches(self, order: list[int], step_in_epoch: int, stage, accum: int) -> list[list[int]]:
        G = stage.global_batch_size
        chunk = order[step_in_epoch * G:(step_in_epoch + 1) * G]
        share = len(chunk) // self.ctx.world_size
        mine = chunk[self.ctx.rank * share:(self.ctx.rank + 1) * share]
        b = stage.per_device_batch_size
        return [mine[i * b:(i + 1) * b] for i in range(accum)]

    # ---------------------------------------------------------------- run

    def run(self) -> list[StageResult]:
        for i, stage in enumerate(self.recipe.stages):
            check_stage(stage, i)
        start_stage = 0
        ckpt = latest_checkpoint(self.ckpt_root) if self.resume else None
        if self.resume and ckpt is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.ckpt_root)
        if ckpt is not None:
            peek = json.loads((ckpt / "state.json").read_text())
            start_stage = peek["stage"]
            for j in range(start_stage):  # earlier stages' structure (e.g. LoRA) must exist before loading
                set_trainable(self.model, self.recipe.stages[j])
            log.info("resuming from %s (stage %d, step %d)", ckpt, peek["stage"], peek["step"])
        results = []
        for index in range(start_stage, len(self.recipe.stages)):
            results.append(self.run_stage(index, ckpt if index == start_stage else None))
        return results

    def run_stage(self, index: int, ckpt: Path | None) -> StageResult:
        stage = self.recipe.stages[index]
        model = self.model
        set_trainable(model, stage)
        data_cfg, dataset = self.stage_dataset(index, stage)
        accum = grad_accum_steps(stage, self.ctx.world_size)
        steps = total_steps(stage, len(dataset))
        steps_per_epoch = max(1, len(dataset) // stage.global_batch_size)
        if len(dataset) < stage.global_batch_size:
            raise ValueError(f"stages[{index}]: {len(dataset)} usable samples, fewer than one global batch "
                             f"({stage.global_batch_size})")
        train_model = dist_utils.wrap(model, self.recipe.train.strategy, self.ctx)
        optimizer = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999), eps=1e-8,
                                      **({"foreach": False} if self.ctx.world_size > 1 else {}))
        scheduler = cosine_with_warmup(optimizer, steps, stage.warmup_ratio)
        result = StageResult(stage.name, steps)
        skips = dataset.skips.copy()  # records rejected when indexing, then samples that fail to load
        step = 0
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            step = state["step"]
            result.losses = state.get("losses", [])
            skips = SkipCounter.from_dict(state.get("skipped"))
        self._log_plan(index, stage, dataset, steps, accum)

        collator = self._collator()
        autocast = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16,
                                  enabled=self.recipe.train.bf16)
        if self.recipe.train.gradient_checkpointing:
            enable_activation_checkpointing(model.llm)
        model.train()
        bar = tqdm(total=steps, initial=step, desc=f"stage {index} {stage.name}", disable=not self.ctx.is_main,
                   dynamic_ncols=True)
        t0, tokens_seen = time.time(), 0
        order_epoch, order = None, None
        while step < steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = epoch_order(dataset, data_cfg, epoch, self.recipe.train.seed, stage.per_device_batch_size,
                                    self.ctx.world_size, accum)
                order_epoch = epoch
            batches = []
            for idx in self.micro_batches(order, in_epoch, stage, accum):
                b = collator([dataset[i] for i in idx])
                skips.merge(b["skips"])
                if b["num_samples"]:
                    batches.append({k: b[k] for k in MODEL_KEYS if k in b})
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            n_tokens = dist_utils.all_reduce_sum(n_tokens, self.ctx)
            loss_sum = 0.0
            optimizer.zero_grad(set_to_none=True)
            for k, b in enumerate(batches):
                with dist_utils.no_sync(train_model, k < len(batches) - 1), autocast:
                    out = train_model(**b, return_logits=False, loss_reduction="sum")
                    # DDP averages gradients over ranks: scale so the result is the global token mean
                    loss = out.loss * (self.ctx.world_size / max(n_tokens, 1))
                loss.backward()
                loss_sum += float(out.loss.detach())
                tokens_seen += int(b["attention_mask"].sum())
            grad_norm = dist_utils.clip_grad_norm(train_model, model, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            step_loss = dist_utils.all_reduce_sum(loss_sum, self.ctx) / max(n_tokens, 1)
            result.losses.append(step_loss)
            elapsed = time.time() - t0
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen * self.ctx.world_size / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            self._metrics({"stage": index, "step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm)})
            if self.eval_hook is not None:
                self.eval_hook.maybe_run(model, step, log, stage=stage)
            every = self.recipe.train.save_every
            if every and step % every == 0 and step < steps:
                result.skipped = skips.to_dict()
                self._save(index, step, model, optimizer, scheduler, result)
            _crash_for_tests(index, step)
        bar.close()
        result.seconds = time.time() - t0
        result.skipped = skips.to_dict()
        self._save(index, step, model, optimizer, scheduler, result)
        if self.ctx.is_main:
            self._summary(index, stage, result, skips)
        return result

    # ---------------------------------------------------------------- helpers

    def _collator(self):
        from mmkit.data.collate import Collator

        return Collator(self.model.processor)

    def _save(self, index, step, model, optimizer, scheduler, result):
        state = {"stage": index, "step": step, "losses": result.losses, "skipped": result.skipped}
        if self.recipe.train.strategy == "fsdp":
            dist_utils.save_sharded(self.ckpt_root, model, optimizer, scheduler, state, self.recipe, self.ctx)
            return
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_root, model, optimizer, scheduler, state, self.recipe, self.recipe.train.keep_last)
        dist_utils.barrier(self.ctx)

    def _metrics(self, row: dict) -> None:
        if self.ctx.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def _log_plan(self, index, stage, dataset, steps, accum):
        if not self.ctx.is_main:
            return
        parts = plan(self.model, stage)
        desc = ", ".join(f"{k}={v.mode} ({v.trainable:,}/{v.params:,} trainable)" for k, v in parts.items())
        log.info("stage %d %r: %d samples, %d steps, global batch %d = %d per device x %d processes x %d accumulation; %s",
                 index, stage.name, len(dataset), steps, stage.global_batch_size, stage.per_device_batch_size,
                 self.ctx.world_size, accum, desc)

    def _summary(self, index, stage, result: StageResult, skips) -> None:
        last = result.losses[-1] if result.losses else float("nan")
        log.info("stage %d %r done: %d steps in %.1fs, final loss %.4f", index, stage.name, result.steps,
                 result.seconds, last)
        log.info("stage %d %s", index, skips.summary("skipped records"))


def _crash_for_tests(stage: int, step: int) -> None:
    """Fault injection for the resume tests: ``MMKIT_TEST_KILL_AT=STAGE:STEP`` kills the process there."""
    target = os.environ.get("MMKIT_TEST_KILL_AT")
    if target and target == f"{stage}:{step}":
        os._exit(137)


def dry_run(model, recipe) -> str:
    """The plan of every stage without training: parts, steps, memory estimate."""
    lines = [f"recipe {recipe.name!r}: {len(recipe.stages)} stage(s)"]
    for i, stage in enumerate(recipe.stages):
        check_stage(stage, i)
        set_trainable(model, stage)
        lines.append(f"stage {i} {stage.name!r} (template {stage.template or model.template}):")
        for part, p in plan(model, stage).items():
            lr = f", lr {p.lr:g}" if p.lr is not None and p.mode != "frozen" else ""
            lines.append(f"  {part:<9} {p.mode:<6} trainable {p.trainable:>14,} / {p.params:>14,}{lr}")
        world = dist_utils.context().world_size
        accum = grad_accum_steps(stage, world)
        if stage.max_steps:
            steps = f"{stage.max_steps} steps (max_steps)"
        else:
            steps = f"{stage.epochs:g} epoch(s) = ceil(epochs x samples / {stage.global_batch_size}) steps"
        lines.append(f"  schedule  {steps}; global batch {stage.global_batch_size} = {stage.per_device_batch_size}"
                     f" per device x {world} process(es) x {accum} accumulation; cosine, warmup {stage.warmup_ratio:g}")
        mem = estimate_memory_bytes(model, stage.per_device_batch_size, recipe.model.max_length, recipe.train.bf16)
        gib = {k: v / 2**30 for k, v in mem.items()}
        lines.append(f"  memory    ~{gib['total']:.2f} GiB per device (weights {gib['weights']:.2f}, grads "
                     f"{gib['grads']:.2f}, AdamW {gib['optimizer']:.2f}, activations {gib['activations']:.2f})")
    return "\n".join(lines)


__all__ = ["Trainer", "dry_run", "StageResult"]
