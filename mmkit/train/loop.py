"""The training loop: stages in order, gradient accumulation, checkpoints, exact resume.

Batches come from :class:`mmkit.data.sampler.StepBatchSampler`: one global order per epoch, optimizer step
``s`` uses samples ``order[s*G:(s+1)*G]`` (G = global batch), each rank takes its contiguous share as
micro-batches. The loss of a step is the sum of token losses divided by the number of supervised tokens in
the whole global batch, so 1 process, N processes and any accumulation give the same gradients.

The micro-batches are loaded by one ``torch.utils.data.DataLoader`` per stage over that sampler
(:func:`mmkit.data.loader.build_loader`; ``data.num_workers`` worker processes, 0 = in this process), built
from the stage's start step, so a resumed stage loads exactly the micro-batches it has not trained on yet; the
order and contents do not depend on the number of workers. Time the step spent blocked waiting for the loader is
reported as ``data_wait`` (log line) and ``data_wait_s`` (metrics.jsonl).

With ``data.packing`` each micro-batch's samples are packed into rows (:mod:`mmkit.data.packing`); the samples
of a step, hence its loss, are those of the unpacked run. The padding share of a step's micro-batches (pad
positions over all positions, over all ranks) is ``pad_share`` in metrics.jsonl and, per log interval, ``pad``
in the log line, with or without packing.

With ``data.batch_by_tokens`` the loader's unit is a rank's whole share of a step, which the collator cuts into
micro-batches of at most that many positions (:func:`mmkit.data.packing.token_budget_groups`); ranks may then
run different numbers of micro-batches, so :func:`mmkit.train.distributed.even_micro_batches` pads the shorter
ones with weight-0 repeats.

A stage with ``objective: dpo`` (:mod:`mmkit.train.dpo`) takes preference pairs: each micro-batch holds the
chosen rows then the rejected rows (with ``data.packing`` those sequences packed into rows), the loss of a step
is the mean of the per-pair losses over the whole global batch (plus ``sft_weight`` times the token-mean cross-entropy of the chosen answers), and the step's mean reward
margin / accuracy / chosen and rejected rewards are ``reward_margin``, ``reward_accuracy``, ``reward_chosen``,
``reward_rejected`` in metrics.jsonl and, per log interval, ``margin`` / ``acc`` in the log line. With
``reference: precomputed`` the stage first scores all its pairs (:func:`mmkit.train.dpo.precompute_reference_logps`)
and its loader's samples carry their dataset index (``pair_index`` in a micro-batch), by which the step looks up
their reference log-probs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from mmkit.compat import enable_activation_checkpointing
from mmkit.data.collate import MODEL_KEYS, Collator
from mmkit.data.dataset import REASONS, IndexedDataset, SkipCounter, build_dataset, data_fingerprint
from mmkit.data.loader import build_loader, resolve_num_workers
from mmkit.data.packing import mask_form_for
from mmkit.data.sampler import StepBatchSampler
from mmkit.eval.hook import EvalHook
from mmkit.train import distributed as dist_utils
from mmkit.train.checkpoint import load_checkpoint, resumable_checkpoint, save_checkpoint, save_sharded
from mmkit.train.dpo import (
    Reference,
    dpo_loss,
    load_reference_logps,
    model_sequence_logps,
    precompute_reference_logps,
    reference_mode,
    save_reference_logps,
    sequence_counts,
)
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


@dataclass
class StageState:
    """One running stage: what :meth:`Trainer.setup_stage` builds and the step methods read and update."""

    index: int
    stage: Any
    dataset: Any
    sampler: StepBatchSampler
    batches: Any  # the iterator of the stage's DataLoader over ``sampler``: collated micro-batches
    train_model: torch.nn.Module  # the model as wrapped for the strategy (DDP / FSDP) or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    result: StageResult
    skips: SkipCounter  # records rejected when indexing, then samples that failed to load
    step: int  # optimizer steps taken (a resumed stage starts at the checkpoint's step)
    autocast: Any
    bar: Any
    t0: float
    tokens_seen: int = 0  # this rank's non-padding tokens since the stage (re)started
    log_losses: list = field(default_factory=list)  # step losses since the last train.log_every line
    log_tokens: int = 0  # tokens_seen at the last train.log_every line
    log_t0: float = 0.0
    step_wait: float = 0.0  # seconds the last step spent blocked in next(batches)
    log_wait: float = 0.0  # the same, summed since the last train.log_every line
    step_tokens: int = 0  # this rank's sample tokens in the last step's micro-batches
    step_slots: int = 0  # their padded positions (rows x width, summed over the micro-batches)
    log_pads: int = 0  # pad positions over all ranks since the last train.log_every line
    log_slots: int = 0  # all positions, the same
    variable_micro_batches: bool = False  # data.batch_by_tokens: ranks may get different numbers of micro-batches
    reference: Any = None  # objective dpo: the frozen reference (mmkit.train.dpo.Reference)
    step_extra: dict = field(default_factory=dict)  # objective dpo: the last step's reward metrics
    log_extra: list = field(default_factory=list)  # the same, per step since the last train.log_every line

    @property
    def steps(self) -> int:
        return self.result.steps


def _reapply_rates(optimizer, scheduler, groups: list[dict]) -> None:
    """After a checkpoint's optimizer state is loaded: the recipe's learning rates and weight decay again, so a
    change allowed with --resume-changed takes effect (unchanged ones come out as the very same numbers)."""
    for group, want in zip(optimizer.param_groups, groups):
        group["initial_lr"], group["weight_decay"] = want["lr"], want["weight_decay"]
    scheduler.base_lrs = [want["lr"] for want in groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def _reasons(skips: SkipCounter) -> str:
    return ", ".join(f"{n} {REASONS.get(k, k)}" for k, n in sorted(skips.counts.items())) or "no reason recorded"


class Trainer:
    """Runs a recipe's stages. ``callbacks``: callables ``cb(stage_index, step)`` run after every optimizer step
    (after its metrics, eval and periodic save)."""

    def __init__(self, model, recipe, run_dir: Path, resume: bool = False, callbacks: Iterable[Callable] = ()):
        self.model = model
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.callbacks = list(callbacks)
        self.ctx = dist_utils.context()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"

        self.eval_hook = EvalHook.from_recipe(recipe, self.run_dir)  # None unless train.eval_every > 0

    # ---------------------------------------------------------------- data

    def stage_dataset(self, index: int, stage):
        data_cfg = stage.data or self.recipe.data
        template = stage.template or self.model.template
        def make():
            return build_dataset(data_cfg, self.model.processor, template=template,
                                 max_length=self.recipe.model.max_length, base_dir=".",
                                 data_dir=self.run_dir / "data", plugins=self.recipe.plugins,
                                 seed=self.recipe.train.seed)

        # rank 0 first: a registered data source may generate data that the other ranks then read
        dataset = make() if self.ctx.is_main else None
        dist_utils.barrier(self.ctx)
        if dataset is None:
            dataset = make()
        if self.ctx.is_main and dataset.skips.total:
            log.warning("stage %d: %s", index, dataset.skips.summary())
        return data_cfg, dataset

    def stage_sampler(self, stage, data_cfg, dataset, start_step: int, steps: int) -> StepBatchSampler:
        group = data_cfg.group_by_modality_length
        # batch_by_tokens: the loader's unit is this process's whole share of a step, cut into micro-batches by
        # the collator once the samples' token counts are known
        per_device = (stage.global_batch_size // self.ctx.world_size if data_cfg.batch_by_tokens
                      else stage.per_device_batch_size)
        return StepBatchSampler(dataset.modality_lengths if group else len(dataset), stage.global_batch_size,
                                per_device, self.ctx.world_size, self.ctx.rank,
                                seed=self.recipe.train.seed, group_by_modality_length=group,
                                start_step=start_step, total_steps=steps)

    def stage_loader(self, index: int, data_cfg, dataset, sampler: StepBatchSampler):
        """The stage's DataLoader over ``sampler``: ``data.num_workers`` processes collate on the CPU."""
        workers = resolve_num_workers(data_cfg.num_workers, self.ctx.world_size)
        if self.ctx.is_main:
            key = f"stages[{index}].data" if self.recipe.stages[index].data is not None else "data"
            how = (f"by {workers} DataLoader worker process(es) per training process" if workers
                   else "in each training process itself (no workers)")
            log.info("stage %d: data loaded %s (%s.num_workers=%s)", index, how, key,
                     "null: the default" if data_cfg.num_workers is None else data_cfg.num_workers)
        return build_loader(dataset, sampler, self._collator(index, data_cfg), workers, data_cfg.prefetch_factor,
                            pin_memory=self.model.device.type == "cuda", seed=self.recipe.train.seed + index)

    def load_step(self, st: StageState) -> list[dict]:
        """This rank's next ``accum`` collated micro-batches; samples that failed to load are counted (skips from
        the workers merged here) and left out. Time blocked waiting for the loader goes to ``st.step_wait``."""
        batches, wait = [], 0.0
        st.step_tokens = st.step_slots = 0
        # a DPO step finds each packed sequence by its pack_layout; the model takes no such key
        keys = (*MODEL_KEYS, "pair_index", *(("pack_layout",) if st.reference is not None else ()))
        for _ in range(st.sampler.accum):
            t = time.perf_counter()
            b = next(st.batches)
            wait += time.perf_counter() - t
            st.skips.merge(b["skips"])
            st.step_tokens += b["num_tokens"]
            st.step_slots += b["num_slots"]
            if b["num_samples"]:
                for micro in b.get("micro_batches", [b]):  # data.batch_by_tokens: a whole step in one item
                    batches.append({k: micro[k] for k in keys if k in micro})
        st.step_wait = wait
        st.log_wait += wait
        st.tokens_seen += st.step_tokens
        return batches

    # ---------------------------------------------------------------- run

    def run(self) -> list[StageResult]:
        for i, stage in enumerate(self.recipe.stages):
            check_stage(stage, i)
        start_stage = 0
        ckpt = resumable_checkpoint(self.ckpt_root, log) if self.resume else None
        if self.resume and ckpt is None:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.ckpt_root)
        if ckpt is not None:
            peek = json.loads((ckpt / "state.json").read_text())
            start_stage = peek["stage"]
            for j in range(start_stage):  # earlier stages' structure (e.g. LoRA) must exist before loading
                set_trainable(self.model, self.recipe.stages[j])
            log.info("resuming from %s (stage %d, step %d)", ckpt, peek["stage"], peek["step"])
            if self.ctx.is_main:
                self._trim_metrics(peek["stage"], peek["step"])
        results = []
        for index in range(start_stage, len(self.recipe.stages)):
            results.append(self.run_stage(index, ckpt if index == start_stage else None))
        return results

    def run_stage(self, index: int, ckpt: Path | None) -> StageResult:
        st = self.setup_stage(index, ckpt)
        while st.step < st.steps:
            batches = self.load_step(st)
            loss, grad_norm = self.optimizer_step(st, batches)
            self.after_step(st, loss, grad_norm)
        return self.end_stage(st)

    def setup_stage(self, index: int, ckpt: Path | None) -> StageState:
        """Trainable parts, data, optimizer and schedule of stage ``index``; from ``ckpt`` when resuming."""
        stage = self.recipe.stages[index]
        model = self.model
        if (stage.trainable.llm in ("lora", "qlora") and getattr(model, "_mmkit_fsdp", False)
                and not getattr(model.llm, "peft_config", None)):
            raise ValueError(f"stages[{index}].trainable.llm: {stage.trainable.llm} under train.strategy fsdp only "
                             "from stages[0] on: an earlier stage sharded the model (FSDP2) without adapters, and "
                             "adapters added afterwards would be unsharded weights whose gradients no rank reduces; "
                             "use train.strategy ddp, or make stages[0] a LoRA stage")
        set_trainable(model, stage)
        data_cfg, dataset = self.stage_dataset(index, stage)
        if stage.objective == "dpo":
            key = f"stages[{index}].data" if stage.data is not None else "data"
            if data_cfg.batch_by_tokens:
                raise ValueError(f"stages[{index}]: objective dpo does not take {key}.batch_by_tokens (a "
                                 "micro-batch holds per_device_batch_size pairs, padded or packed with "
                                 f"{key}.packing)")
            if not all(getattr(d, "preference", False) for d in getattr(dataset, "datasets", [dataset])):
                raise ValueError(f"stages[{index}]: objective dpo needs preference records (chosen / rejected) in "
                                 f"every {key}.sources file")
        accum = grad_accum_steps(stage, self.ctx.world_size, by_tokens=bool(data_cfg.batch_by_tokens))
        steps = total_steps(stage, len(dataset))
        if len(dataset) < stage.global_batch_size:
            raise ValueError(f"stages[{index}]: {len(dataset)} usable samples, fewer than one global batch "
                             f"({stage.global_batch_size})")
        reference, mode = None, None
        autocast = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16,
                                  enabled=self.recipe.train.bf16)
        if stage.objective == "dpo":  # the stage's starting weights, before anything trains or is wrapped
            mode = reference_mode(stage, index, self.recipe.stages, self.recipe.train.strategy)
            if mode == "copy" and self.recipe.train.strategy == "fsdp" and self.ctx.world_size > 1:
                raise ValueError(f"stages[{index}].reference: a frozen copy is not supported with train.strategy "
                                 f"fsdp (FSDP2-sharded modules cannot be copied); set stages[{index}].reference: "
                                 "precomputed (or use train.strategy ddp)")
            if mode != "precomputed":
                reference = Reference(mode, model, self.run_dir / "dpo_reference" / f"stage{index}.pt",
                                      resumed=ckpt is not None, is_main=self.ctx.is_main)
                dist_utils.barrier(self.ctx)
        train_model = dist_utils.wrap(model, self.recipe.train.strategy, self.ctx)
        if mode == "precomputed":  # after wrapping: under FSDP the sharded model scores
            reference = self.precomputed_reference(index, stage, data_cfg, dataset, ckpt is not None, autocast)
        if mode is not None and self.ctx.is_main:
            log.info("stage %d: DPO (%s, beta %g, sft_weight %g), reference: %s", index, stage.loss_type,
                     stage.beta, stage.sft_weight,
                     {"adapter": "the model with its LoRA adapters disabled",
                      "copy": "a frozen copy of the stage's starting weights",
                      "precomputed": "log-probs precomputed with the stage's starting weights"}[mode])
        optimizer = torch.optim.AdamW(param_groups(model, stage), betas=(0.9, 0.999), eps=1e-8,
                                      **({"foreach": False} if self.ctx.world_size > 1 else {}))
        scheduler = cosine_with_warmup(optimizer, steps, stage.warmup_ratio)
        result = StageResult(stage.name, steps)
        skips = dataset.skips.copy()
        step = 0
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            _reapply_rates(optimizer, scheduler, param_groups(model, stage))
            step = state["step"]
            result.losses = state.get("losses", [])
            skips = SkipCounter.from_dict(state.get("skipped"))
        self._log_plan(index, stage, dataset, steps, accum, data_cfg)

        if self.recipe.train.gradient_checkpointing:
            enable_activation_checkpointing(model.llm)
        model.train()
        bar = tqdm(total=steps, initial=step, desc=f"stage {index} {stage.name}", disable=not self.ctx.is_main,
                   dynamic_ncols=True)
        sampler = self.stage_sampler(stage, data_cfg, dataset, step, steps)
        # a precomputed reference is looked up by each pair's index in the dataset
        loaded = IndexedDataset(dataset) if mode == "precomputed" else dataset
        batches = iter(self.stage_loader(index, data_cfg, loaded, sampler))  # workers start here
        t0 = time.time()
        return StageState(index, stage, dataset, sampler, batches, train_model, optimizer, scheduler, result, skips,
                          step, autocast, bar, t0, log_t0=t0, variable_micro_batches=bool(data_cfg.batch_by_tokens),
                          reference=reference)

    def precomputed_reference(self, index: int, stage, data_cfg, dataset, resumed: bool, autocast) -> Reference:
        """``reference: precomputed``: the stage's table of reference log-probs,
        ``RUN/dpo_reference/stageN.safetensors`` -- reused by a resumed run (refused when the data changed),
        otherwise computed now with the starting weights (each rank its share of the pairs, gathered) and written
        once."""
        path = self.run_dir / "dpo_reference" / f"stage{index}.safetensors"
        fingerprint = data_fingerprint(dataset)
        where = f"stages[{index}].reference: precomputed"
        if self.resume and path.is_file():
            table = load_reference_logps(path, fingerprint, where)
            if self.ctx.is_main:
                log.info("stage %d: DPO reference log-probs of %d pairs reused from %s", index, table.shape[0], path)
        elif resumed:
            raise FileNotFoundError(f"{where}: {path}, the reference log-probs of the stage being resumed, is missing "
                                    "(it is written when the stage starts)")
        else:
            if self.ctx.is_main:
                log.info("stage %d: scoring the %d pairs with the stage's starting weights (reference: "
                         "precomputed)", index, len(dataset))
            t = time.time()
            table = precompute_reference_logps(
                self.model, dataset, self._collator(index, data_cfg), stage.per_device_batch_size, self.ctx, autocast,
                resolve_num_workers(data_cfg.num_workers, self.ctx.world_size), data_cfg.prefetch_factor,
                desc=f"stage {index} {stage.name} reference log-probs")
            if self.ctx.is_main:
                save_reference_logps(path, table, fingerprint)
                log.info("stage %d: reference log-probs of %d pairs in %.1fs, written to %s", index, table.shape[0],
                         time.time() - t, path)
            dist_utils.barrier(self.ctx)
        if table.shape != (len(dataset), 2):
            raise ValueError(f"{where}: {path} holds {tuple(table.shape)} log-probs for {len(dataset)} pairs")
        return Reference.precomputed(table)

    def optimizer_step(self, st: StageState, batches: list[dict]) -> tuple[float, torch.Tensor]:
        """Forward and backward over one step's micro-batches, clip, step. Returns (token-mean loss, grad norm)."""
        if st.reference is not None:
            return self.dpo_step(st, batches)
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        n_tokens = dist_utils.all_reduce_sum(n_tokens, self.ctx)
        if n_tokens == 0:  # every sample dropped (e.g. max_length below the image tokens): not a "success"
            raise ValueError(f"stages[{st.index}] step {st.step + 1}: no supervised token in the whole global batch, "
                             f"every sample was dropped ({_reasons(st.skips)}); check model.max_length "
                             "against the prompt and image tokens")
        loss_sum = 0.0
        st.optimizer.zero_grad(set_to_none=True)
        weights = [1.0] * len(batches)
        if st.variable_micro_batches:  # data.batch_by_tokens: as many micro-batches on every rank
            batches, weights = dist_utils.even_micro_batches(batches, self.ctx)
        for k, (b, weight) in enumerate(zip(batches, weights)):
            with dist_utils.no_sync(st.train_model, k < len(batches) - 1), st.autocast:
                out = st.train_model(**b, return_logits=False, loss_reduction="sum")
                # DDP averages gradients over ranks: scale so the result is the global token mean
                loss = out.loss * (weight * self.ctx.world_size / max(n_tokens, 1))
            loss.backward()
            loss_sum += weight * float(out.loss.detach())
        grad_norm = dist_utils.clip_grad_norm(st.train_model, self.model, st.stage.max_grad_norm)
        st.optimizer.step()
        st.scheduler.step()
        st.step += 1
        return dist_utils.all_reduce_sum(loss_sum, self.ctx) / max(n_tokens, 1), grad_norm

    def dpo_step(self, st: StageState, batches: list[dict]) -> tuple[float, torch.Tensor]:
        """One DPO optimizer step: per micro-batch the reference's and the policy's sequence log-probs of its
        chosen and rejected rows, the pair losses scaled to the mean over the global batch's pairs. Returns
        (loss, grad norm); the step's reward metrics go to ``st.step_extra``."""
        stage = st.stage
        seq_counts = [sequence_counts(b) for b in batches]  # [2P] per micro-batch, chosen then rejected
        n_pairs = dist_utils.all_reduce_sum(sum(len(c) // 2 for c in seq_counts), self.ctx)
        if n_pairs == 0:
            raise ValueError(f"stages[{st.index}] step {st.step + 1}: no preference pair in the whole global batch, "
                             f"every sample was dropped ({_reasons(st.skips)})")
        n_chosen = 0
        if stage.sft_weight:
            n_chosen = sum(int(c[: len(c) // 2].sum()) for c in seq_counts)
            n_chosen = dist_utils.all_reduce_sum(n_chosen, self.ctx)
        sums = dict.fromkeys(("loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"), 0.0)
        st.optimizer.zero_grad(set_to_none=True)
        for k, b in enumerate(batches):
            index = b.pop("pair_index", None)  # not a model input
            with st.autocast:
                ref_c, ref_r = st.reference.logps(st.train_model, self.model, b, index).float().chunk(2)
            with dist_utils.no_sync(st.train_model, k < len(batches) - 1), st.autocast:
                logps, counts = model_sequence_logps(st.train_model, b)
                (pc, pr), (nc, nr) = logps.float().chunk(2), counts.chunk(2)
                out = dpo_loss(pc, pr, ref_c, ref_r, stage.beta, stage.loss_type, stage.label_smoothing,
                               chosen_tokens=nc, rejected_tokens=nr)
                total = out.losses.sum() / n_pairs
                if stage.sft_weight:
                    total = total + stage.sft_weight * (-pc.sum()) / max(n_chosen, 1)
                loss = total * self.ctx.world_size  # DDP averages gradients over ranks
            loss.backward()
            sums["loss"] += float(total.detach())
            sums["reward_margin"] += float(out.margins.sum()) / n_pairs
            sums["reward_accuracy"] += float(out.accuracies.sum()) / n_pairs
            sums["reward_chosen"] += float(out.chosen_rewards.sum()) / n_pairs
            sums["reward_rejected"] += float(out.rejected_rewards.sum()) / n_pairs
        grad_norm = dist_utils.clip_grad_norm(st.train_model, self.model, stage.max_grad_norm)
        st.optimizer.step()
        st.scheduler.step()
        st.step += 1
        totals = {key: dist_utils.all_reduce_sum(v, self.ctx) for key, v in sums.items()}
        st.step_extra = {key: round(v, 6) for key, v in totals.items() if key != "loss"}
        return totals["loss"], grad_norm

    def after_step(self, st: StageState, loss: float, grad_norm: torch.Tensor) -> None:
        """Metrics, progress bar, the train.log_every line, eval hook, periodic save, then the callbacks."""
        st.result.losses.append(loss)
        tok_s = st.tokens_seen * self.ctx.world_size / max(time.time() - st.t0, 1e-9)
        st.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
        st.bar.update(1)
        pads = dist_utils.all_reduce_sum(st.step_slots - st.step_tokens, self.ctx)
        slots = dist_utils.all_reduce_sum(st.step_slots, self.ctx)
        st.log_pads += pads
        st.log_slots += slots
        self._metrics({"stage": st.index, "step": st.step, "loss": loss, "lr": st.scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "data_wait_s": round(st.step_wait, 6),
                       "pad_share": round(pads / max(slots, 1), 6), **st.step_extra})
        self._log_progress(st, loss)
        if self.eval_hook is not None:
            self.eval_hook.maybe_run(self.model, st.step, log, stage=st.stage)
        every = self.recipe.train.save_every
        if every and st.step % every == 0 and st.step < st.steps:
            st.result.skipped = st.skips.to_dict()
            self._save(st)
        for callback in self.callbacks:
            callback(st.index, st.step)

    def end_stage(self, st: StageState) -> StageResult:
        """The stage's final checkpoint and summary."""
        st.bar.close()
        st.batches = None  # the loader's worker processes exit now, not whenever the state is collected
        st.result.seconds = time.time() - st.t0
        st.result.skipped = st.skips.to_dict()
        self._save(st)
        if self.ctx.is_main:
            self._summary(st.index, st.stage, st.result, st.skips)
        return st.result

    # ---------------------------------------------------------------- helpers

    def _collator(self, index: int, data_cfg) -> Collator:
        """Pads each micro-batch, or packs it with ``data.packing`` (the 4D mask in the form the LLM's attention
        implementation takes)."""
        budget = data_cfg.batch_by_tokens
        if budget and self.ctx.is_main:
            log.info("stage %d: micro-batches of at most %d tokens (data.batch_by_tokens; per_device_batch_size is "
                     "not used)", index, budget)
        dpo = self.recipe.stages[index].objective == "dpo"  # token budgets were refused in setup_stage
        if not data_cfg.packing:
            return Collator(self.model.processor, pairs=True) if dpo else Collator(self.model.processor,
                                                                                    token_budget=budget)
        pack_length = data_cfg.pack_length or self.recipe.model.max_length
        impl = getattr(self.model.llm.config, "_attn_implementation", None)
        form = mask_form_for(impl)
        if self.ctx.is_main:
            log.info("stage %d: packing each micro-batch into rows of at most %d tokens (4D %s block-diagonal "
                     "causal mask for %s attention)", index, pack_length, form, impl)
        if dpo:  # each micro-batch's 2P sequences, chosen then rejected
            return Collator(self.model.processor, pack_length=pack_length, mask_form=form, pairs=True)
        return Collator(self.model.processor, pack_length=pack_length, mask_form=form, token_budget=budget)

    def _save(self, st: StageState) -> None:
        state = {"stage": st.index, "step": st.step, "losses": st.result.losses, "skipped": st.result.skipped}
        if self.recipe.train.strategy == "fsdp":
            save_sharded(self.ckpt_root, self.model, st.optimizer, st.scheduler, state, self.recipe, self.ctx)
            return
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_root, self.model, st.optimizer, st.scheduler, state, self.recipe,
                            self.recipe.train.keep_last)
        dist_utils.barrier(self.ctx)

    def _log_progress(self, st: StageState, loss: float) -> None:
        """Every ``train.log_every`` steps (0: never) one run-log line: mean loss since the last line, lr, tokens/s,
        data_wait: seconds blocked waiting for batches since the last line, and their share of that time, and pad:
        the share of pad positions in the micro-batches of those steps (all ranks)."""
        st.log_losses.append(loss)
        if st.step_extra:
            st.log_extra.append(st.step_extra)
        every = self.recipe.train.log_every
        if every <= 0 or st.step % every:
            return
        now = time.time()
        if self.ctx.is_main:
            interval = max(now - st.log_t0, 1e-9)
            tok_s = (st.tokens_seen - st.log_tokens) * self.ctx.world_size / interval
            log.info("stage %d %s step %d/%d: loss %.4f (mean of %d steps), lr %.3g, %.0f tokens/s, "
                     "data_wait %.3fs (%.0f%%), pad %.1f%%", st.index, st.stage.name, st.step, st.steps,
                     sum(st.log_losses) / len(st.log_losses), len(st.log_losses), st.scheduler.get_last_lr()[0],
                     tok_s, st.log_wait, 100 * st.log_wait / interval, 100 * st.log_pads / max(st.log_slots, 1))
            if st.log_extra:
                n = len(st.log_extra)
                log.info("stage %d %s step %d/%d: DPO reward margin %.4f, accuracy %.3f, chosen %.4f, rejected "
                         "%.4f (means of %d steps)", st.index, st.stage.name, st.step, st.steps,
                         *(sum(e[k] for e in st.log_extra) / n for k in
                           ("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected")), n)
        st.log_losses, st.log_tokens, st.log_t0, st.log_wait = [], st.tokens_seen, now, 0.0
        st.log_extra = []
        st.log_pads = st.log_slots = 0

    def _trim_metrics(self, stage: int, step: int) -> None:
        """Drop the rows of steps after the checkpoint (the killed run logged them; the resumed run redoes them)."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if (row.get("stage", 0), row.get("step", 0)) <= (stage, step):
                kept.append(line + "\n")
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.metrics_path)

    def _metrics(self, row: dict) -> None:
        if self.ctx.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def _log_plan(self, index, stage, dataset, steps, accum, data_cfg):
        if not self.ctx.is_main:
            return
        parts = plan(self.model, stage)
        desc = ", ".join(f"{k}={v.mode} ({v.trainable:,}/{v.params:,} trainable)" for k, v in parts.items())
        world = self.ctx.world_size
        if data_cfg.batch_by_tokens:
            split = (f"{stage.global_batch_size // world} per process x {world} processes, in micro-batches of at "
                     f"most {data_cfg.batch_by_tokens} tokens")
        else:
            split = f"{stage.per_device_batch_size} per device x {world} processes x {accum} accumulation"
        log.info("stage %d %r: %d samples, %d steps, global batch %d = %s; %s",
                 index, stage.name, len(dataset), steps, stage.global_batch_size, split, desc)

    def _summary(self, index, stage, result: StageResult, skips) -> None:
        last = result.losses[-1] if result.losses else float("nan")
        log.info("stage %d %r done: %d steps in %.1fs, final loss %.4f", index, stage.name, result.steps,
                 result.seconds, last)
        log.info("stage %d %s", index, skips.summary("skipped records"))


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
        data_cfg = stage.data or recipe.data
        accum = grad_accum_steps(stage, world, by_tokens=bool(data_cfg.batch_by_tokens))
        if stage.max_steps:
            steps = f"{stage.max_steps} steps (max_steps)"
        else:
            steps = f"{stage.epochs:g} epoch(s) = ceil(epochs x samples / {stage.global_batch_size}) steps"
        lines.append(f"  schedule  {steps}; global batch {stage.global_batch_size} = {stage.per_device_batch_size}"
                     f" per device x {world} process(es) x {accum} accumulation; cosine, warmup {stage.warmup_ratio:g}")
        if data_cfg.batch_by_tokens:
            lines.append(f"  batches   micro-batches of at most {data_cfg.batch_by_tokens} tokens (data.batch_by_tokens; "
                         "the per-device batch and accumulation above are not used)")
        if data_cfg.packing:
            lines.append(f"  packing   each micro-batch into rows of at most "
                         f"{data_cfg.pack_length or recipe.model.max_length} tokens")
        rows, width = stage.per_device_batch_size, recipe.model.max_length
        if data_cfg.batch_by_tokens:  # at most that many positions: as many full-length rows as fit
            rows = max(1, data_cfg.batch_by_tokens // width)
        mem = estimate_memory_bytes(model, rows, width, recipe.train.bf16)
        gib = {k: v / 2**30 for k, v in mem.items()}
        lines.append(f"  memory    ~{gib['total']:.2f} GiB per device (weights {gib['weights']:.2f}, grads "
                     f"{gib['grads']:.2f}, AdamW {gib['optimizer']:.2f}, activations {gib['activations']:.2f})")
    return "\n".join(lines)


__all__ = ["Trainer", "dry_run", "StageResult"]
