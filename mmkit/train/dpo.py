"""Direct preference optimisation: the loss as a pure function and the per-sequence log-probabilities it takes.

A DPO batch holds ``2P`` rows: the ``P`` chosen answers first, then the ``P`` rejected ones, in the same pair
order and with the same prompts and images (:class:`mmkit.data.collate.Collator` builds it; with
``data.packing`` the ``2P`` sequences are packed into rows instead, ``pack_layout`` telling where each lies). A
sequence's log-probability is the sum of the log-probabilities of its supervised tokens (labels != -100,
shifted by one: token ``t+1`` is predicted at position ``t``), as ``DPOTrainer`` in TRL (``trl/trainer/dpo_trainer.py``) sums
``log_probs`` over the completion.

Losses (``z = (logp_c - ref_c) - (logp_r - ref_r)``):

* ``sigmoid`` -- DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta z)``; with ``label_smoothing`` ``e`` the
  conservative form ``-(1-e) log sigmoid(beta z) - e log sigmoid(-beta z)``.
* ``ipo`` -- IPO (Azar et al. 2023, eq. 17) on per-token means of the log-ratios, as TRL computes it:
  ``((lr_c / n_c - lr_r / n_r) - 1 / (2 beta))^2`` with ``n`` the supervised tokens of each answer.

Rewards are ``beta * (logp - ref)``; margin = chosen - rejected reward; accuracy = margin > 0.

The reference (``stages[i].reference``) is the stage's starting weights: ``adapter`` (the model with its LoRA
adapters disabled), ``copy`` (a frozen copy in memory) or ``precomputed`` (every pair scored once when the stage
starts, :func:`precompute_reference_logps`, and looked up by the pair's dataset index during training, as TRL's
``precompute_ref_log_probs`` does).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mmkit.data.collate import MODEL_KEYS
from mmkit.data.dataset import IndexedDataset
from mmkit.data.loader import build_loader
from mmkit.train import distributed as dist_utils

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo")

__all__ = ["DPOLoss", "dpo_loss", "sequence_logps", "model_sequence_logps", "sequence_counts", "LOSS_TYPES",
           "Reference", "frozen_copy", "reference_mode", "precompute_reference_logps", "load_reference_logps", "save_reference_logps"]


@dataclass
class DPOLoss:
    losses: torch.Tensor  # [P] per pair
    chosen_rewards: torch.Tensor  # [P], detached
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor  # [P] floats, 1.0 where the chosen reward is higher


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> DPOLoss:
    """Per-pair DPO / IPO losses from sequence log-probs (``[P]`` each). ``ipo`` needs ``chosen_tokens`` and
    ``rejected_tokens`` (supervised tokens per answer)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs chosen_tokens and rejected_tokens (answer lengths)")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choices: {', '.join(LOSS_TYPES)}")
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOLoss(losses, chosen_rewards, rejected_rewards, margins, (margins > 0).float())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob sums [B], supervised token counts [B])`` of full ``[B, T, V]`` logits against ``[B, T]``
    labels (-100 masked, shifted inside). The reference for :func:`model_sequence_logps`, which avoids the full
    logits."""
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(1), mask.sum(1)


def _packed_sequence_sums(batch: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums ``[sequences]`` of ``[rows, T]`` ``values`` over a packed batch, from its ``pack_layout``
    (sequence ``k`` holds positions ``start:start + length`` of its row; padding counts for none)."""
    layout = batch["pack_layout"]
    n = sum(len(row) for row in layout)
    seq = torch.full(values.shape, n, dtype=torch.long)  # n: padding, one past the last sequence
    for r, row in enumerate(layout):
        for k, start, length in row:
            seq[r, start:start + length] = k
    sums = torch.zeros(n + 1, device=values.device, dtype=values.dtype)
    return sums.index_add(0, seq.flatten().to(values.device), values.flatten())[:n]


def sequence_counts(batch: dict) -> torch.Tensor:
    """Supervised tokens of each sequence of a collated pair batch (``[2P]``, chosen then rejected): a padded
    row's labels after the first, or a packed sequence's (:func:`mmkit.data.packing.pack_samples` has masked
    its first label, which the shift drops in a padded row)."""
    labels = batch["labels"]
    if "pack_layout" not in batch:
        return (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return _packed_sequence_sums(batch, (labels != IGNORE_INDEX).long())


def model_sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob sums [sequences], supervised token counts [sequences])`` of a collated batch under ``model`` (a
    :class:`mmkit.model.VisionLanguageModel`, possibly DDP-wrapped); logits are made for supervised positions
    only when the LM head is a plain linear layer. A packed batch (``pack_layout``, ``data.packing``) is scored
    per position and each sequence's positions are summed, so its sequences come out in the order they were
    packed from, as a padded batch's rows."""
    if "pack_layout" not in batch:
        out = model(**batch, return_logits=False, loss_reduction="sequence")
        return -out.loss, sequence_counts(batch).to(out.loss.device)
    inputs = {k: v for k, v in batch.items() if k != "pack_layout"}
    out = model(**inputs, return_logits=False, loss_reduction="token")  # [rows, T]
    # a sequence's last position predicts the next sequence's first token, whose label pack_samples masked: 0 here
    return -_packed_sequence_sums(batch, out.loss), sequence_counts(batch).to(out.loss.device)


def reference_mode(stage, index: int, stages, strategy: str = "single") -> str:
    """``adapter``, ``copy`` or ``precomputed``: the stage's ``reference`` key with ``auto`` resolved (``adapter``
    with LoRA; otherwise ``copy``, or ``precomputed`` under ``train.strategy: fsdp``, where a sharded model cannot
    be copied). A disabled adapter is the stage's starting weights only when no earlier stage trained LoRA
    adapters on the LLM."""
    mode = stage.reference
    lora = stage.trainable.llm in ("lora", "qlora")
    if mode == "auto":
        mode = "adapter" if lora else ("precomputed" if strategy == "fsdp" else "copy")
    if mode == "adapter":
        earlier = [j for j in range(index) if stages[j].trainable.llm in ("lora", "qlora")]
        if earlier:
            raise ValueError(f"stages[{index}].reference: 'adapter' would be the model without the adapters that "
                             f"stages[{earlier[0]}] trained, not this stage's starting weights; set "
                             f"stages[{index}].reference: copy")
    return mode


def frozen_copy(model):
    """A deep copy of ``model`` in eval mode without gradients, leaving out the DDP wrapper an earlier stage kept
    on it (:func:`mmkit.train.distributed.wrap`)."""
    memo = {id(model._mmkit_ddp): []} if getattr(model, "_mmkit_ddp", None) is not None else {}
    out = copy.deepcopy(model, memo).eval().requires_grad_(False)
    out.__dict__.pop("_mmkit_ddp", None)
    return out


@torch.no_grad()
def precompute_reference_logps(model, dataset, collator, batch_size: int, ctx, autocast, num_workers: int = 0,
                               prefetch_factor: int = 2, desc: str = "DPO reference log-probs") -> torch.Tensor:
    """``[len(dataset), 2]`` float32: the chosen and rejected sequence log-probs of every pair of ``dataset`` under
    ``model`` as it is now (eval mode, no gradients, under ``autocast``), through ``collator`` (the stage's pair
    collator) in micro-batches of ``batch_size`` pairs, with :func:`model_sequence_logps` (what the loss uses).
    Each rank scores every ``world_size``-th micro-batch; the rows are summed over ranks (each row is scored by
    one rank, the others hold zeros). Pairs that fail to load are NaN. Leaves torch's RNG where it was."""
    n = len(dataset)
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = chunks[ctx.rank::ctx.world_size]
    # FSDP gathers the parameters in every forward: each rank runs as many (extra ones repeat a chunk, unused)
    sharded = ctx.world_size > 1 and getattr(model, "_mmkit_fsdp", False)
    rounds = -(-len(chunks) // ctx.world_size) if sharded else len(mine)
    order = mine + chunks[:rounds - len(mine)]
    loader = build_loader(IndexedDataset(dataset), order, collator, num_workers, prefetch_factor)
    values = torch.zeros(n, 2, dtype=torch.float32)
    scored = torch.zeros(n, dtype=torch.float32)
    training = model.training
    model.eval()
    last = None
    try:
        with torch.random.fork_rng(devices=[]):
            for t, b in enumerate(tqdm(loader, total=len(order), desc=desc, disable=not ctx.is_main,
                                       dynamic_ncols=True)):
                if b["num_samples"]:
                    last = b
                elif not sharded:
                    continue
                elif last is None:
                    raise ValueError(f"rank {ctx.rank}: no pair of its first micro-batch of the stage's data could "
                                     "be loaded, so it has nothing to score beside the other ranks")
                else:
                    t, b = len(order), last  # a forward to match the other ranks', result unused
                with autocast:
                    logps = model_sequence_logps(model, {k: b[k] for k in (*MODEL_KEYS, "pack_layout") if k in b})[0]
                if t < len(mine):
                    idx = b["pair_index"]
                    values[idx] = torch.stack(logps.float().cpu().chunk(2), dim=1)
                    scored[idx] = 1.0
    finally:
        model.train(training)
        dist_utils.reshard(model)
    values = dist_utils.all_reduce_tensor_sum(values, ctx)
    scored = dist_utils.all_reduce_tensor_sum(scored, ctx)
    values[scored == 0] = float("nan")
    return values


def save_reference_logps(path, values: torch.Tensor, fingerprint: str) -> None:
    """``values`` (``[pairs, 2]``) to ``path`` (safetensors, ``logps``), with the data ``fingerprint`` in its
    metadata; written to a temporary name first so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": values.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint,
                                                                 "pairs": str(values.shape[0])})
    os.replace(tmp, path)


def load_reference_logps(path, fingerprint: str, where: str) -> torch.Tensor:
    """The ``[pairs, 2]`` table of ``path``; refused when it was computed on other data than ``fingerprint``'s."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        values = fh.get_tensor("logps")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{where}: {path} holds the reference log-probs of other data than this stage's "
                         f"({meta.get('pairs', '?')} pairs, data fingerprint {str(meta.get('fingerprint'))[:12]}, "
                         f"now {fingerprint[:12]}); resume with the data the stage started with, or start the run "
                         "again in a new train.output_dir")
    return values


class Reference:
    """The frozen reference of a DPO stage: the model with its LoRA adapters disabled (peft's
    ``disable_adapter()``, no second copy), a frozen copy of the stage's starting weights, saved to ``path`` so
    a resumed stage scores with the very same reference, or (``precomputed``) the table of every pair's
    reference log-probs (:meth:`precomputed`). Log-probs are computed without gradients."""

    def __init__(self, mode: str, model, path, resumed: bool, is_main: bool):
        self.mode = mode
        self.copy = None
        self.table = None
        if mode == "copy":
            self.copy = frozen_copy(model)
            path = Path(path)
            if resumed:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: the DPO reference weights of the stage being resumed are "
                                            "missing (they are written when the stage starts)")
                self.copy.load_state_dict(torch.load(path, map_location=model.device, weights_only=True))
            elif is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(self.copy.state_dict(), tmp)
                os.replace(tmp, path)

    @classmethod
    def precomputed(cls, table: torch.Tensor) -> "Reference":
        out = cls("precomputed", None, None, False, False)
        out.table = table
        return out

    @torch.no_grad()
    def logps(self, train_model, model, batch: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence log-probs ``[rows]`` of ``batch`` under the reference (``train_model``: the policy as wrapped
        for the strategy, ``model``: unwrapped; ``index``: the batch's ``pair_index``, for ``precomputed``)."""
        if self.mode == "precomputed":
            if index is None:
                raise ValueError("a precomputed DPO reference needs the batch's pair_index (IndexedDataset)")
            ref = self.table[index.cpu()]
            if torch.isnan(ref).any():
                raise ValueError(f"pairs {index[torch.isnan(ref).any(1)].tolist()}: no precomputed reference "
                                 "log-probs (they failed to load when the stage started)")
            # [chosen rows; rejected rows], as the collated batch
            return torch.cat([ref[:, 0], ref[:, 1]]).to(model.device)
        if self.mode == "adapter":
            with model.llm.disable_adapter():
                return model_sequence_logps(train_model, batch)[0]
        return model_sequence_logps(self.copy, batch)[0]
