"""LoRA adapters after training: save them, then merge into a plain checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mmkit.train")


def has_lora(model) -> bool:
    return bool(getattr(model.llm, "peft_config", None))


def save_adapter(model, out_dir: str | Path) -> Path:
    """The LLM's LoRA adapter (peft layout) plus the other trained weights (connector, ...)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    model.llm.save_pretrained(out_dir)
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(rest, str(out_dir / "non_lora_trainables.safetensors"))
    return out_dir


def merge_lora(model):
    """Fold the adapters into the LLM's weights; the model becomes a plain mmkit model."""
    if has_lora(model):
        model.llm = model.llm.merge_and_unload()
    return model
