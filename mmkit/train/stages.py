"""What a stage trains: frozen | full | lora per part, learning rate per part, the plan."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmkit.quant import quantize_llm
from mmkit.recipe import PARTS

NO_DECAY = ("bias", "norm", "image_newline")


def check_stage(stage, index: int) -> None:
    """The stage's cross-field rules (a recipe loaded from YAML was checked already; a hand-built one is not)."""
    stage.check(f"stages[{index}]")


def grad_accum_steps(stage, world_size: int, by_tokens: bool = False) -> int:
    """Micro-batches per optimizer step and process; 1 with ``data.batch_by_tokens`` (the loader's unit is then a
    process's whole share of the step, which the collator cuts by the token budget)."""
    if by_tokens:
        if stage.global_batch_size % world_size:
            raise ValueError(f"global_batch_size {stage.global_batch_size} is not divisible by the {world_size} "
                             "processes")
        return 1
    per_step = stage.per_device_batch_size * world_size
    if stage.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {stage.global_batch_size} is not divisible by per_device_batch_size "
                         f"x world_size = {per_step}")
    return stage.global_batch_size // per_step


def total_steps(stage, num_samples: int) -> int:
    if stage.max_steps:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * num_samples / stage.global_batch_size))


def apply_lora(model, stage, quantized: bool = False) -> None:
    """Wrap the LLM's linear layers (not lm_head) with peft LoRA adapters, once (QLoRA: over a 4-bit base)."""
    from peft import LoraConfig, get_peft_model  # peft is slow to import: only LoRA needs it

    if getattr(model.llm, "peft_config", None):
        return
    if quantized:
        quantize_llm(model, "4bit")
    targets = sorted({name.split(".")[-1] for name, mod in model.llm.named_modules()
                      if isinstance(mod, nn.Linear) and not name.endswith("lm_head")})  # bnb layers subclass Linear
    cfg = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, lora_dropout=stage.lora_dropout,
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, cfg)


def set_trainable(model, stage) -> None:
    """Freeze / unfreeze parts as the stage says (dead encoder weights never train)."""
    for part in PARTS:
        mode = stage.trainable[part]
        module = getattr(model, part)
        if mode in ("lora", "qlora"):
            apply_lora(model, stage, quantized=mode == "qlora")
            module = model.llm
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            module.requires_grad_(mode == "full")
    if model.image_newline is not None:
        model.image_newline.requires_grad_(stage.trainable.connector != "frozen")
    for p in model.vision.dead_parameters():
        p.requires_grad_(False)


def part_of(name: str) -> str:
    if name == "image_newline":
        return "connector"
    return name.split(".", 1)[0]


def param_groups(model, stage) -> list[dict]:
    """AdamW groups: per part learning rate, no weight decay on biases and norms."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        decay = not any(k in name.lower() for k in NO_DECAY) and p.dim() > 1
        groups.setdefault((part, decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": float(stage.lr[part]), "weight_decay": stage.weight_decay if decay else 0.0,
                    "name": f"{part}{'' if decay else '/no_decay'}"})
    return out


def cosine_with_warmup(optimizer, total: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup) if warmup else 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class PartPlan:
    mode: str
    params: int
    trainable: int
    lr: float | None


def plan(model, stage) -> dict[str, PartPlan]:
    out = {}
    for part in PARTS:
        module = getattr(model, part)
        params = list(module.parameters())
        out[part] = PartPlan(stage.trainable[part], sum(p.numel() for p in params),
                             sum(p.numel() for p in params if p.requires_grad), stage.lr[part])
    return out


def estimate_memory_bytes(model, per_device_batch: int, seq_len: int, bf16: bool) -> dict:
    """A rough training-memory estimate: weights + grads + AdamW states + activations."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wbytes = 2 if bf16 else 4
    cfg = model.llm.config.get_text_config()
    layers = getattr(cfg, "num_hidden_layers", 1)
    hidden = getattr(cfg, "hidden_size", 1)
    activations = per_device_batch * seq_len * hidden * layers * 16 * wbytes
    return {
        "weights": total * wbytes,
        "grads": trainable * 4,
        "optimizer": trainable * 8,
        "activations": activations,
        "total": total * wbytes + trainable * 12 + activations,
    }
