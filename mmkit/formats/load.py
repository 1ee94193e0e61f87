"""Reading checkpoint directories into models: ``load(path)`` detects the layout and builds the model."""

from __future__ import annotations

import copy
from pathlib import Path

from safetensors.torch import load_model
from transformers import AutoTokenizer

from mmkit.builder import build
from mmkit.formats import detect_layout
from mmkit.formats.llava_hf import (
    UnsupportedCheckpointError,
    copy_checked,
    hf_to_mmkit_key,
    read_safetensors_dir,
    recipe_from_hf_config,
)
from mmkit.formats.llava_orig import load_llava_orig
from mmkit.files import read_json, reading_weights
from mmkit.formats.native import FORMAT_VERSION, MARKER
from mmkit.recipe import load_recipe


def load(path: str | Path, **kwargs):
    """Load any supported layout, auto-detected."""
    layout = detect_layout(path)
    if layout == "mmkit":
        return load_mmkit(path, **kwargs)
    if layout == "llava-hf":
        return load_llava_hf(path, **kwargs)
    return load_llava_orig(path, **kwargs)


def load_mmkit(path: str | Path, overrides=(), **build_kwargs):
    path = Path(path)
    marker = read_json(path / MARKER)
    if marker.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer mmkit (format version {marker['version']}); upgrade mmkit")
    recipe = copy.deepcopy(load_recipe(path / "recipe.yaml", overrides))
    # the directory holds every weight: build from the saved configs, never from the hub
    recipe.model.vision.pretrained = None
    recipe.model.llm.pretrained = None
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    recipe.model.llm.tokenizer = None
    model = build(recipe, tokenizer=tokenizer, **build_kwargs)
    with reading_weights(path / "model.safetensors"):
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the recipe: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model


def load_llava_hf(path: str | Path, dtype: str | None = None):
    path = Path(path)
    cfg = read_json(path / "config.json")
    recipe = recipe_from_hf_config(cfg, path)
    if dtype:
        recipe.model.dtype = dtype
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = build(recipe, tokenizer=tokenizer)
    tensors = {hf_to_mmkit_key(k): v for k, v in read_safetensors_dir(path).items() if not k.endswith("inv_freq")}
    own = model.state_dict()
    if "llm.lm_head.weight" not in tensors and "llm.lm_head.weight" in own:
        if not recipe.model.llm.config.get("tie_word_embeddings"):
            raise UnsupportedCheckpointError(f"{path}: lm_head weights are missing and embeddings are not tied")
        tensors["llm.lm_head.weight"] = tensors["llm.model.embed_tokens.weight"]
    copy_checked(own, tensors, f"{path}: weights do not match the config")
    return model


__all__ = ["load", "load_llava_hf", "load_mmkit"]
