"""LoRA adapters after training: save them, then merge into a plain checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mmkit.quant import dequantize_weight

log = logging.getLogger("mmkit.train")


def has_lora(model) -> bool:
    return bool(getattr(model.llm, "peft_config", None))


def save_adapter(model, out_dir: str | Path) -> Path:
    """The LLM's LoRA adapter (peft layout) plus the other trained weights (connector, ...)."""
    out_dir = Path(out_dir)
    model.llm.save_pretrained(out_dir)
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(rest, str(out_dir / "non_lora_trainables.safetensors"))
    return out_dir


def merge_lora(model):
    """Fold the adapters into the LLM's weights; the model becomes a plain mmkit model.

    QLoRA: the 4-bit base is dequantized first, so the merged checkpoint is plain (and exactly the
    function the adapted 4-bit model computed, up to the bf16 compute of the 4-bit layers).
    """
    if not has_lora(model):
        return model
    if getattr(model, "quantization", None) is not None:
        model.llm = _merge_into_dequantized(model.llm.get_base_model(), model.dtype)
        model.quantization = None
        return model
    model.llm = model.llm.merge_and_unload()
    return model


def _merge_into_dequantized(base, dtype):
    """Each LoRA layer over a 4-bit base becomes nn.Linear(dequantized W + LoRA delta)."""
    from peft.tuners.lora import LoraLayer  # peft is slow to import: only runs that use LoRA load it

    count = 0
    for name, mod in list(base.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        layer = mod.get_base_layer()
        weight = dequantize_weight(layer).to(torch.float32)
        for adapter in mod.active_adapters:
            weight = weight + mod.get_delta_weight(adapter).to(torch.float32)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                          device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight.to(dtype))
            if layer.bias is not None:
                plain.bias.copy_(layer.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, plain)
        count += 1
    log.info("QLoRA: merged %d adapters into dequantized base weights", count)
    return base
