"""The transformers ``llava-hf`` layout: Llava, LlavaNext and LlavaOnevision directories.

Import accepts both the hub file layout (``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``) and what transformers 5 ``save_pretrained`` writes (the CLIP tower
as ``vision_tower.*`` without ``vision_model.``), and the in-memory names (``model.language_model.*``).
Export writes the hub layout, loadable by transformers' Auto classes with no missing or
unexpected keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from mmkit._version import __version__
from mmkit.files import atomic_dir, read_json, reading_weights, shard_files
from mmkit.recipe import Recipe, recipe_from_dict, split_known_fields

log = logging.getLogger(__name__)

ARCHS = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
LLM_PRESETS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


class UnsupportedCheckpointError(ValueError):
    pass


def is_llava_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    data = read_json(cfg)
    return data.get("model_type") in ARCHS and "vision_config" in data and "mm_vision_tower" not in data


# --------------------------------------------------------------------------- weights


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's ``model.safetensors`` or sharded ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(shard_files(index))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: convert them to safetensors first)" if bins else ""
        raise UnsupportedCheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        with reading_weights(path / name), safe_open(str(path / name), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


_IMPORT_PREFIXES = [  # (hf prefix, mmkit prefix), first match wins
    ("model.language_model.", "llm.model."),
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("lm_head.", "llm.lm_head."),
    ("model.vision_tower.vision_model.", "vision.tower."),
    ("model.vision_tower.", "vision.tower."),
    ("vision_tower.vision_model.", "vision.tower."),
    ("vision_tower.", "vision.tower."),
    ("model.multi_modal_projector.linear_1.", "connector.proj.0."),
    ("model.multi_modal_projector.linear_2.", "connector.proj.2."),
    ("multi_modal_projector.linear_1.", "connector.proj.0."),
    ("multi_modal_projector.linear_2.", "connector.proj.2."),
    ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
]


def hf_to_mmkit_key(key: str) -> str:
    for src, dst in _IMPORT_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    raise UnsupportedCheckpointError(f"unexpected weight {key!r} in a llava-hf checkpoint")


def mmkit_to_hf_key(key: str) -> str:
    for src, dst in (
        ("llm.model.", "language_model.model."),
        ("llm.lm_head.", "language_model.lm_head."),
        ("vision.tower.", "vision_tower.vision_model."),
        ("connector.proj.0.", "multi_modal_projector.linear_1."),
        ("connector.proj.2.", "multi_modal_projector.linear_2."),
        ("image_newline", "image_newline"),
    ):
        if key.startswith(src):
            return dst + key[len(src):]
    raise ValueError(f"weight {key!r} has no llava-hf name")


def copy_checked(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into the state-dict tensors ``own``: same keys and shapes, or one clear error."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        more = lambda keys: "..." if len(keys) > 5 else ""  # noqa: E731
        raise UnsupportedCheckpointError(
            f"{what}: missing {missing[:5]}{more(missing)}, unexpected {unexpected[:5]}{more(unexpected)}")
    with torch.no_grad():
        for key, value in tensors.items():
            if own[key].shape != value.shape:
                raise UnsupportedCheckpointError(
                    f"{what}: {key} has shape {tuple(value.shape)}, the model needs {tuple(own[key].shape)}")
            own[key].copy_(value)


# --------------------------------------------------------------------------- config


def recipe_from_hf_config(cfg: dict, path: Path) -> Recipe:
    model_type = cfg["model_type"]
    vcfg, tcfg = dict(cfg["vision_config"]), dict(cfg["text_config"])
    vision_name = VISION_TYPES.get(vcfg.get("model_type"))
    if vision_name is None:
        raise UnsupportedCheckpointError(
            f"{path}: vision_config.model_type {vcfg.get('model_type')!r} is not supported "
            f"(supported: {', '.join(VISION_TYPES)})"
        )
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise UnsupportedCheckpointError(f"{path}: a list vision_feature_layer ({layer}) is not supported")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedCheckpointError(f"{path}: projector_hidden_act {act!r} is not supported (only exact 'gelu')")
    preproc = {}
    if (path / "preprocessor_config.json").is_file():
        preproc = read_json(path / "preprocessor_config.json")
    image = {"convention": "hf", "backend": "fast"}  # transformers 5 processors default to the torchvision backend
    if model_type == "llava":
        image.update(aspect_ratio="pad" if preproc.get("do_pad") else "square", merge="flat")
    else:
        image.update(aspect_ratio="anyres", merge="spatial_unpad",
                     grid_pinpoints=[list(p) for p in cfg.get("image_grid_pinpoints") or preproc.get("image_grid_pinpoints", [])])
        if model_type == "llava_onevision":
            ratio = cfg.get("vision_aspect_ratio", "anyres_max_9")
            if ratio.startswith("anyres_max_"):
                image["anyres_max"] = int(ratio[len("anyres_max_"):])
    if preproc.get("image_mean"):
        image["mean"], image["std"] = list(preproc["image_mean"]), list(preproc["image_std"])
    text_type = tcfg.get("model_type", "llama")
    tie = cfg.get("tie_word_embeddings", tcfg.get("tie_word_embeddings", False))
    tcfg["tie_word_embeddings"] = tie
    # fields of older transformers versions that the current config classes no longer have: not kept
    tcfg, dropped = split_known_fields(AutoConfig.for_model(text_type), tcfg)
    vcfg, dropped_v = split_known_fields(AutoConfig.for_model(vcfg["model_type"]), vcfg)
    if dropped or dropped_v:
        log.info("%s: config fields no longer in transformers' classes, not kept: %s", path, dropped + dropped_v)
    data = {
        "name": path.name,
        "model": {
            "vision": {"name": vision_name, "config": vcfg, "feature_layer": layer,
                       "select": "patch" if strategy == "default" else "cls_patch"},
            "connector": {"name": "mlp2x_gelu", "bias": cfg.get("multimodal_projector_bias", True)},
            "llm": {"name": LLM_PRESETS.get(text_type, "auto"), "config": tcfg},
            "image": image,
            "image_token_id": cfg.get("image_token_index", cfg.get("image_token_id")),
            "video_token_id": cfg.get("video_token_index", cfg.get("video_token_id")),
            "dtype": "float32",
        },
    }
    return recipe_from_dict(data, str(path / "config.json"))


# --------------------------------------------------------------------------- export


def written_by_mmkit(path: Path) -> bool:
    """A llava-hf directory that mmkit exported (its config.json carries ``mmkit_export``)."""
    try:
        return "mmkit_export" in read_json(path / "config.json")
    except (OSError, ValueError):
        return False


def save_llava_hf(model, out_dir: str | Path, overwrite: bool = False) -> Path:
    m = model.recipe.model
    if m.vision.name not in ("clip", "siglip"):
        raise ValueError(
            f"model.vision.name={m.vision.name!r} has no llava-hf form: transformers' Llava classes "
            "take CLIP or SigLIP vision towers only"
        )
    if model.connector.kind != "mlp2x_gelu":
        raise ValueError(
            f"model.connector.name={m.connector.name!r} has no llava-hf form: LlavaMultiModalProjector "
            "is always Linear-GELU-Linear (mlp2x_gelu)"
        )
    spec = model.image_spec
    if spec.merge == "flat" and spec.aspect_ratio == "anyres":
        raise ValueError("anyres tiling with a flat merge has no llava-hf form (LlavaNext needs spatial_unpad)")
    if spec.merge == "flat":
        model_type = "llava"
    else:
        model_type = "llava_onevision" if spec.anyres_max else "llava_next"
    vision_cfg = model.vision.config.to_dict()
    text_cfg = model.llm.config.to_dict()
    cfg = {
        "architectures": [ARCHS[model_type]],
        "model_type": model_type,
        "vision_config": vision_cfg,
        "text_config": text_cfg,
        "image_token_index": model.image_token_id,
        "vision_feature_layer": model.vision.feature_layer,
        "vision_feature_select_strategy": "default" if (model.vision.has_cls and model.vision.select == "patch")
        else "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": m.connector.bias,
        "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings", False)),
        "mmkit_export": {"mmkit_version": __version__},  # who wrote it: overwrite= replaces only such a directory
    }
    pinpoints = [list(p) for p in spec.pinpoints_hw]  # (h, w), as transformers reads them
    if spec.convention == "orig" and model_type != "llava":
        log.warning("exporting an original-LLaVA AnyRes model: transformers uses its own grid tie-break and unpad "
                    "rounding, so small images and a few rare sizes will be tiled differently there "
                    "(see convention in the README)")
    if model_type != "llava":
        cfg["image_grid_pinpoints"] = pinpoints
        cfg["use_image_newline_parameter"] = True
    if model_type == "llava_onevision":
        cfg["vision_aspect_ratio"] = f"anyres_max_{spec.anyres_max}"
        if m.video_token_id is not None:
            cfg["video_token_index"] = m.video_token_id
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "llm.lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        tensors[mmkit_to_hf_key(key)] = value.detach().contiguous().clone()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, ours=written_by_mmkit, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(model, model_type), indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
    return out_dir


def _preprocessor_config(model, model_type: str) -> dict:
    img = model.image_spec
    size = img.image_size
    squash = model.vision.spec.resize_mode == "squash"
    cls = {"llava": "LlavaImageProcessor", "llava_next": "LlavaNextImageProcessor",
           "llava_onevision": "LlavaOnevisionImageProcessor"}[model_type]
    out = {
        "image_processor_type": cls,
        "do_resize": True,
        "size": {"height": size, "width": size} if squash else {"shortest_edge": size},
        "do_center_crop": not squash,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(img.mean),
        "image_std": list(img.std),
        "do_convert_rgb": True,
        "resample": 3,
    }
    if model_type == "llava":
        out["do_pad"] = img.aspect_ratio == "pad"
    else:
        out["image_grid_pinpoints"] = [list(p) for p in img.pinpoints_hw]
    return out
