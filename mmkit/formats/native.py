"""mmkit's own directory layout.

    DIR/mmkit.json         {"format": "mmkit", "version": 1, ...}
    DIR/recipe.yaml        the resolved recipe: it alone rebuilds the model (no hub access)
    DIR/model.safetensors  all weights, mmkit key names
    DIR/tokenizer*         the tokenizer (save_pretrained)

Writes are atomic (``mmkit.files.atomic_dir``): everything goes to a temporary sibling directory, is
fsynced, and then renamed over the target, so a kill mid-save leaves the previous checkpoint intact; a
target folder holding anything but a previous save is refused, never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file, save_model

from mmkit._version import __version__
from mmkit.files import atomic_dir

FORMAT_VERSION = 1
MARKER = "mmkit.json"


def save_mmkit(model, out_dir: str | Path, extra: dict | None = None, state_dict: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write an mmkit directory; ``state_dict`` replaces the model's own (e.g. gathered from FSDP shards);
    ``overwrite`` replaces a previous mmkit save there (anything else in the way is refused)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, ours=is_mmkit_dir, overwrite=overwrite) as tmp:
        if state_dict is None:
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            _save_state_dict(state_dict, tmp / "model.safetensors")
        model.recipe.save(tmp / "recipe.yaml")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        marker = {"format": "mmkit", "version": FORMAT_VERSION, "mmkit_version": __version__,
                  "image_token_id": model.image_token_id, **(extra or {})}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def _save_state_dict(state_dict: dict, path: Path) -> None:
    """Like safetensors' save_model for a plain dict: one copy of tensors that share storage."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, value in state_dict.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            continue  # tied weights (e.g. lm_head = embed_tokens): load_model restores the tie
        seen[ident] = key
        out[key] = value.detach().contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def is_mmkit_dir(path: Path) -> bool:
    return (path / MARKER).is_file()
