"""The original LLaVA repo layout (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT): import into mmkit.

A directory in this layout holds a flat LLM config extended with ``mm_*`` fields (``mm_vision_tower``,
``mm_hidden_size``, ``mm_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``image_aspect_ratio``, ``mm_patch_merge_type``, ``image_grid_pinpoints``, ...) and weights named like
``LlavaLlamaForCausalLM``'s state dict::

    model.embed_tokens.*  model.layers.*  model.norm.*  lm_head.*        -> llm.model.* / llm.lm_head.*
    model.mm_projector.{weight,bias}      (linear)                        -> connector.proj.{weight,bias}
    model.mm_projector.{0,2,..}.*         (mlpNx_gelu)                    -> connector.proj.{0,2,..}.*
    model.vision_tower.vision_tower.vision_model.<CLIP/SigLIP suffix>     -> vision.tower.<suffix>
    model.vision_tower.vision_tower.<suffix>  (what llava-torch writes under transformers 5)
    model.image_newline                                                     -> image_newline

Entry points:

* ``load_llava_orig(path, dtype=None, vision_tower=None, tokenizer=None, template=None, base=None)``: a full
  checkpoint (``model.safetensors[.index.json]`` or ``pytorch_model[.bin.index.json]``; ``.bin`` files are read only
  with ``torch.load(weights_only=True)``), or a LoRA checkpoint (``adapter_config.json`` + ``adapter_model.*`` +
  ``non_lora_trainables.bin``): the base is loaded, the non-LoRA trainables applied, the adapter merged.
* ``load_projector(model, path)``: a stage-1 ``mm_projector.bin`` into a built mmkit model.

What import decides (so that logits equal the original repo's in fp32):

* **Vision tower.** Weights in the checkpoint win (the released 1.6 towers were tuned; 1.5 towers equal CLIP).
  Its architecture comes from ``mm_vision_tower``: a local directory, the Hugging Face cache (never the network),
  or, only when the checkpoint carries the tower weights, a built-in config for the few public towers LLaVA uses.
  Without tower weights the tower is loaded from that directory. Otherwise one error names the id and how to point
  at a local copy (``vision_tower=DIR``). SigLIP towers follow LLaVA-NeXT: the last block is dropped and the output
  of the one before is used (whatever ``mm_vision_select_layer`` says), no head.
* **AnyRes.** ``image_grid_pinpoints`` are kept exactly as stored (orig reads each pair as ``(w, h)``) and the recipe
  gets ``convention: orig``, under which mmkit reads them as ``(w, h)`` and reproduces orig's tie-breaks and
  ``int()`` rounding (``llava/mm_utils.py`` ``select_best_resolution`` and ``llava/model/llava_arch.py``
  ``unpad_image`` in haotian-liu/LLaVA, versus transformers' ``image_processing_llava_next.py``). The LLaVA-NeXT range form ``"(1x1),...,(6x6)"`` is expanded with the
  tower's image size.
* **The -200 sentinel.** Orig puts one ``-200`` per image in ``input_ids``; mmkit's processor emits as many copies of
  a real token id as the image has features. That id is the tokenizer's ``<image>``: added as a special token when
  missing. The embedding matrix is grown only when that id (or any tokenizer id) falls outside it (LLaMA/Vicuna:
  32000 rows, ``<image>`` = 32000 -> 32001 rows; Qwen2 configs have spare rows, so nothing grows). New rows are set
  to the mean of the checkpoint's rows: the input row is never read (image positions get image features), and an
  LM-head row equal to the mean gives the mean logit, which is never the greedy choice. Without a tokenizer the
  image id is ``vocab_size`` (one past the vocabulary, never looked up) and nothing grows.
* **Not imported:** prompt wrapping with ``<im_start>``/``<im_end>`` or patch tokens (``mm_use_im_start_end``,
  ``mm_use_im_patch_token``), vision resamplers, projector types other than linear / mlpNx_gelu / identity,
  ``image_aspect_ratio`` other than square / pad / anyres / anyres_max_N, merges other than flat / spatial_unpad:
  each raises ``UnsupportedCheckpointError`` naming the field. ``tokenizer_model_max_length`` becomes
  ``model.max_length`` (orig truncates after image expansion; mmkit truncates in the processor).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from mmkit.builder import DTYPES, build
from mmkit.files import read_json, shard_files
from mmkit.formats.llava_hf import UnsupportedCheckpointError, copy_checked
from mmkit.hub import HubUnavailableError
from mmkit.processing.anyres import parse_grid_pinpoints
from mmkit.recipe import recipe_from_dict, split_known_fields
from mmkit.registry import connectors

log = logging.getLogger(__name__)

__all__ = [
    "UnsupportedCheckpointError",
    "is_llava_orig_config",
    "load_llava_orig",
    "load_projector",
    "orig_to_mmkit_key",
    "recipe_from_orig_config",
]

IMAGE_TOKEN_INDEX = -200  # the original repo's placeholder id (never embedded)

# architectures / model_type -> mmkit LLM preset (and the transformers model_type of the language model)
ARCH_PRESETS = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}
MODEL_TYPE_PRESETS = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
PRESET_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

VISION_MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}

# Architectures of the public towers LLaVA checkpoints name in mm_vision_tower (facts from their config.json files).
# Used only when the checkpoint itself carries the tower weights, so that no download is needed.
KNOWN_TOWERS: dict[str, tuple[str, dict]] = {
    "openai/clip-vit-large-patch14-336": ("clip", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)),
    "openai/clip-vit-large-patch14": ("clip", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)),
    "google/siglip-so400m-patch14-384": ("siglip", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
}

# Config fields of the original layouts that are consumed here or have no effect on an image forward pass; they
# are removed from the LLM config. Any other ``mm_*`` field is unknown and raises.
_CONSUMED = {
    "mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "image_aspect_ratio", "mm_patch_merge_type", "image_grid_pinpoints",
    "tokenizer_model_max_length", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_resampler_type",
}
_IGNORED = {
    # training switches and learning rates
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "tune_mm_vision_resampler",
    "freeze_mm_vision_resampler", "mm_projector_lr", "mm_vision_tower_lr", "mm_tunable_parts", "use_mm_proj",
    "pretrain_mm_mlp_adapter", "tokenizer_padding_side", "vision_tower_pretrained", "delay_load",
    # LLaVA-NeXT video / resampler knobs that do not touch the image path
    "mm_spatial_pool_stride", "mm_spatial_pool_mode", "mm_spatial_pool_out_channels", "mm_newline_position",
    "mm_pooling_position", "mm_mask_drop_mode", "mm_mask_drop_skip_percentage", "mm_mask_drop_ratio",
    "mm_mask_drop_ratio_upper", "mm_mask_drop_ratio_lower", "mm_perceiver_depth", "mm_perceiver_latents",
    "mm_perceiver_ff_mult", "mm_perceiver_pretrained", "mm_qformer_depth", "mm_qformer_latents",
    "mm_qformer_pretrained", "add_faster_video", "faster_token_stride", "force_sample", "add_time_instruction",
    "image_crop_resolution", "image_split_resolution", "use_pos_skipping", "pos_skipping_range",
    # bookkeeping
    "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
}

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {"float32", "bfloat16", "float16"}


# --------------------------------------------------------------------------- small helpers


def is_llava_orig_config(cfg: dict) -> bool:
    return "mm_vision_tower" in cfg or "mm_hidden_size" in cfg


def _torch_load(path: Path) -> dict:
    """``.bin`` files: never unpickle arbitrary objects."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise UnsupportedCheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One weight file (``.safetensors`` or ``.bin``)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return _torch_load(path)


class _Checkpoint:
    """The weight files of a directory, read one shard at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: dict[str, torch.Tensor] | None = None
        for index in _WEIGHT_INDEXES:
            if (path / index).is_file():
                self.files = [path / f for f in shard_files(path / index)]
                self._keys = list(read_json(path / index)["weight_map"])
                return
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                self.files = [path / name]
                self._keys = None
                return
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if "mm_projector.bin" in found or "mm_projector.safetensors" in found:
            raise UnsupportedCheckpointError(
                f"{path}: holds only a projector (a stage-1 checkpoint): load the model it was trained for and "
                f"apply it with mmkit.formats.llava_orig.load_projector(model, {str(path)!r})"
            )
        raise UnsupportedCheckpointError(
            f"{path}: no weights found (looked for {', '.join(_WEIGHT_INDEXES + _WEIGHT_FILES)}; "
            f"found: {', '.join(found[:10]) or 'nothing'})"
        )

    def keys(self) -> list[str]:
        if self._keys is None:
            f = self.files[0]
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as fh:
                    self._keys = list(fh.keys())
            else:
                self._cache = _torch_load(f)
                self._keys = list(self._cache)
        return self._keys

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            if self._cache is not None:
                tensors, self._cache = self._cache, None
            else:
                tensors = _read_tensors(f)
            yield from tensors.items()
            del tensors


class _TensorDict:
    """An in-memory source (non_lora_trainables) with the same interface as _Checkpoint."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def items(self):
        return iter(self.tensors.items())


_TOWER_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")
_TOWER_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")


def orig_to_mmkit_key(key: str) -> str | None:
    """mmkit name of an original-layout weight; None for buffers that are not weights (rotary ``inv_freq``)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("lm_head."):
        return "llm." + key
    if key.startswith("model.mm_projector."):
        return "connector.proj." + key[len("model.mm_projector."):]
    for prefix in _TOWER_PREFIXES:
        if key.startswith(prefix):
            return "vision.tower." + key[len(prefix):]
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith(("model.vision_tower.", "model.vision_resampler.", "model.mm_")):
        raise UnsupportedCheckpointError(f"weight {key!r}: this part of an original LLaVA model is not supported")
    if key.startswith("model."):
        return "llm." + key
    raise UnsupportedCheckpointError(f"unexpected weight {key!r} in an original LLaVA checkpoint")


def _local_snapshot(name: str) -> Path | None:
    """A local directory for ``name``: the path itself, or a Hugging Face cache snapshot (no network)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        return None
    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError), or an invalid id
        return None


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------- config -> recipe


def _llm_preset(cfg: dict, path: Path) -> str:
    for arch in cfg.get("architectures") or []:
        if arch in ARCH_PRESETS:
            return ARCH_PRESETS[arch]
    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPE_PRESETS:
        return MODEL_TYPE_PRESETS[model_type]
    if model_type == "llava" and not cfg.get("architectures"):
        return "llama"  # v0/v1-era uploads: LlavaConfig(LlamaConfig) with model_type "llava"
    raise UnsupportedCheckpointError(
        f"{path}: unsupported original LLaVA model: model_type {model_type!r}, architectures "
        f"{cfg.get('architectures')}; supported: {', '.join(ARCH_PRESETS)} "
        f"(model_type {', '.join(MODEL_TYPE_PRESETS)} or llava)"
    )


def _connector_name(cfg: dict, path: Path) -> str:
    kind = cfg.get("mm_projector_type") or "linear"  # absent (v0/v1-era configs) = linear
    if kind in ("linear", "identity"):
        return kind
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)

    if m and kind in connectors.names():
        return kind
    raise UnsupportedCheckpointError(
        f"{path}: mm_projector_type {kind!r} is not supported; supported: linear, identity, "
        f"{', '.join(n for n in connectors.names() if n.startswith('mlp'))}"
    )


def _image_config(cfg: dict, path: Path, tile: int) -> dict:
    ratio = cfg.get("image_aspect_ratio") or "square"
    image: dict = {"convention": "orig", "backend": "pil"}
    m = re.fullmatch(r"anyres_max_(\d+)", ratio)
    if ratio in ("square", "pad"):
        image["aspect_ratio"] = ratio
    elif ratio == "anyres" or m:
        image["aspect_ratio"] = "anyres"
        if m:
            image["anyres_max"] = int(m.group(1))
        pinpoints = cfg.get("image_grid_pinpoints")
        if not pinpoints:
            raise UnsupportedCheckpointError(f"{path}: image_aspect_ratio {ratio!r} needs image_grid_pinpoints")
        try:
            # kept in the stored pair order: orig reads (w, h), and so does mmkit under convention 'orig'
            image["grid_pinpoints"] = parse_grid_pinpoints(pinpoints, tile)
        except ValueError as exc:
            raise UnsupportedCheckpointError(f"{path}: image_grid_pinpoints: {exc}") from None
    else:
        raise UnsupportedCheckpointError(
            f"{path}: image_aspect_ratio {ratio!r} is not supported; supported: square, pad, anyres, anyres_max_N"
        )
    merge = cfg.get("mm_patch_merge_type") or "flat"
    if merge not in ("flat", "spatial_unpad"):
        raise UnsupportedCheckpointError(
            f"{path}: mm_patch_merge_type {merge!r} is not supported; supported: flat, spatial_unpad"
        )
    if merge == "spatial_unpad" and image["aspect_ratio"] != "anyres":
        # orig merges spatially only for AnyRes view stacks; square/pad images come as one 4-D tensor -> flat
        merge = "flat"
    image["merge"] = merge
    return image


def _resolve_tower(cfg: dict, path: Path, override, ckpt_keys: list[str]) -> dict:
    """Vision encoder name, config, weight source and preprocessing constants."""
    name = str(override) if override is not None else cfg.get("mm_vision_tower", cfg.get("vision_tower"))
    if not name:
        raise UnsupportedCheckpointError(f"{path}: config.json has mm_hidden_size but no mm_vision_tower")
    tower_keys = [k for k in ckpt_keys if k.startswith(_TOWER_PREFIXES)]
    local = _local_snapshot(name)
    preproc: dict = {}
    if local is not None:
        try:
            vcfg = AutoConfig.from_pretrained(str(local))
        except (OSError, ValueError) as exc:
            raise UnsupportedCheckpointError(
                f"vision tower {name!r} ({local}): no readable vision config ({exc})"
            ) from None
        vcfg = getattr(vcfg, "vision_config", None) or vcfg  # a full CLIP/SigLIP model directory
        kind = VISION_MODEL_TYPES.get(vcfg.model_type)
        if kind is None:
            raise UnsupportedCheckpointError(
                f"vision tower {name!r}: model_type {vcfg.model_type!r} is not supported (CLIP or SigLIP)"
            )
        config = vcfg.to_dict()
        for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
            config.pop(key, None)
        if (local / "preprocessor_config.json").is_file():
            preproc = json.loads((local / "preprocessor_config.json").read_text())
    elif tower_keys and name in KNOWN_TOWERS:
        kind, config = KNOWN_TOWERS[name]
        config = dict(config)
        log.info("vision tower %s: architecture from mmkit's table of public towers, weights from %s", name, path)
    else:
        where = "its weights are not in the checkpoint and " if not tower_keys else ""
        raise HubUnavailableError(
            f"{path}: the vision tower {name!r} (config mm_vision_tower) is needed, but {where}it is not a local "
            f"directory or in the Hugging Face cache; download it where you have network (e.g. `hf download {name} "
            f"--local-dir DIR`) and pass vision_tower=DIR (mmkit.load(path, vision_tower=DIR))"
        )

    full_layers = int(config["num_hidden_layers"])
    built_layers = full_layers
    if tower_keys:
        layers = {int(m.group(1)) for k in tower_keys if (m := _TOWER_LAYER.match(k))}
        n = max(layers) + 1 if layers else 0
        if n != full_layers:
            if kind != "siglip":
                raise UnsupportedCheckpointError(
                    f"{path}: the checkpoint's vision tower has {n} blocks, {name!r} has {full_layers}"
                )
            built_layers = n
            config["num_hidden_layers"] = n
    if kind == "siglip":
        # LLaVA-NeXT's SigLIP tower drops the last block and the head, then takes hidden_states[-1]:
        # absolute hidden state full_layers - 1, whatever mm_vision_select_layer says.
        if tower_keys:
            config["vision_use_head"] = any(".head." in k for k in tower_keys)
        feature_layer = (full_layers - 1) - (built_layers + 1)
        select = "patch"  # no CLS token: ignored
    else:
        feature_layer = int(cfg.get("mm_vision_select_layer", -1))  # orig ModelArguments default -1
        select = cfg.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise UnsupportedCheckpointError(
                f"{path}: mm_vision_select_feature {select!r} is not supported; supported: patch, cls_patch"
            )
    hidden = cfg.get("mm_hidden_size")
    if hidden is not None and int(hidden) != int(config["hidden_size"]):
        raise UnsupportedCheckpointError(
            f"{path}: mm_hidden_size is {hidden} but the vision tower {name!r} has hidden_size {config['hidden_size']}"
        )
    return {
        "name": kind,
        "config": config,
        "feature_layer": feature_layer,
        "select": select,
        "pretrained": str(local) if (local is not None and not tower_keys) else None,
        "preproc": preproc,
        "hub_name": name,
    }


def recipe_from_orig_config(cfg: dict, path: Path, tower: dict, vocab_rows: int, image_token_id: int,
                            dtype: str = "float32", template: str | None = None):
    """The mmkit recipe of an original-layout config (``tower`` from ``_resolve_tower``)."""
    unknown = sorted(k for k in cfg if k.startswith("mm_") and k not in _CONSUMED | _IGNORED)
    if unknown:
        raise UnsupportedCheckpointError(
            f"{path}: unknown original-LLaVA config field(s) {unknown}; mmkit cannot tell whether they change the "
            f"model (known: {', '.join(sorted(k for k in _CONSUMED | _IGNORED if k.startswith('mm_')))})"
        )
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if cfg.get(key):
            raise UnsupportedCheckpointError(
                f"{path}: {key}=true (v0-era image start/end or patch tokens in the prompt) is not supported"
            )
    if cfg.get("mm_resampler_type"):
        raise UnsupportedCheckpointError(
            f"{path}: mm_resampler_type {cfg['mm_resampler_type']!r}: vision resamplers are not supported"
        )
    preset = _llm_preset(cfg, path)
    llm_cfg = {k: v for k, v in cfg.items() if k not in _CONSUMED | _IGNORED and not k.startswith("mm_")}
    llm_cfg["model_type"] = PRESET_MODEL_TYPES[preset]
    llm_cfg["vocab_size"] = vocab_rows
    llm_cfg, dropped = split_known_fields(AutoConfig.for_model(llm_cfg["model_type"]), llm_cfg)
    if dropped:  # fields of older transformers versions: they never changed the forward pass
        log.info("%s: config fields a %s config no longer has, not kept: %s", path, llm_cfg["model_type"], dropped)
    tile = int(tower["config"]["image_size"])
    image = _image_config(cfg, path, tile)
    preproc = tower["preproc"]
    if preproc.get("image_mean") and preproc.get("image_std"):
        image["mean"], image["std"] = list(preproc["image_mean"]), list(preproc["image_std"])
    data = {
        "name": path.name,
        "model": {
            "vision": {"name": tower["name"], "config": tower["config"], "feature_layer": tower["feature_layer"],
                       "select": tower["select"], "pretrained": tower["pretrained"]},
            "connector": {"name": _connector_name(cfg, path), "bias": True},
            "llm": {"name": preset, "config": llm_cfg},
            "image": image,
            "image_token_id": image_token_id,
            "max_length": int(cfg.get("tokenizer_model_max_length") or 2048),
            "dtype": dtype,
        },
    }
    if template is not None:
        data["model"]["template"] = template
    return recipe_from_dict(data, str(path / "config.json"))


# --------------------------------------------------------------------------- tokenizer and image token


def _load_tokenizer(tokenizer, *dirs: Path):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    candidates = [Path(tokenizer)] if tokenizer is not None else list(dirs)
    for d in candidates:
        if d is not None and (d / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(d))
    if tokenizer is not None:
        raise UnsupportedCheckpointError(f"tokenizer {tokenizer}: no tokenizer_config.json there")
    return None


def _image_token(tok, vocab: int, image_token: str = "<image>") -> tuple[int, int]:
    """(image_token_id, embedding rows needed). Adds ``image_token`` to ``tok`` when missing."""
    if tok is None:
        return vocab, vocab
    if image_token not in tok.get_vocab():
        tok.add_tokens([image_token], special_tokens=True)
        log.info("added %s to the tokenizer as id %d", image_token, tok.convert_tokens_to_ids(image_token))
    image_id = int(tok.convert_tokens_to_ids(image_token))
    rows = max(vocab, len(tok), image_id + 1)
    if rows > vocab:
        log.info("growing the embeddings from %d to %d rows for the tokenizer's added tokens", vocab, rows)
    return image_id, rows


def _default_template(preset: str, tok) -> str | None:
    # LLaVA-1.6-34B (Yi, a llama architecture) was trained with chatml_direct; its tokenizer has <|im_start|>
    if preset == "llama" and tok is not None and "<|im_start|>" in tok.get_vocab():
        return "chatml_direct"
    return None


# --------------------------------------------------------------------------- weights


_GROWABLE = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def _copy_weights(model, sources, path: Path, skip_tower: bool) -> None:
    """Copy every source's tensors (later sources override earlier ones) and check nothing is missing."""
    own = model.state_dict()
    filled: set[str] = set()
    grown: dict[str, int] = {}
    unexpected: list[str] = []
    with torch.no_grad():
        for source in sources:
            for key, value in source.items():
                try:
                    mk = orig_to_mmkit_key(key)
                except UnsupportedCheckpointError as exc:
                    raise UnsupportedCheckpointError(f"{path}: {exc}") from None
                if mk is None:
                    continue
                if mk.startswith("vision.tower.") and skip_tower:
                    continue
                if mk == "image_newline" and mk not in own:
                    log.info("%s: model.image_newline is unused (the merge is flat for non-AnyRes images)", path)
                    continue
                if mk not in own:
                    unexpected.append(key)
                    continue
                target = own[mk]
                if mk in _GROWABLE and value.dim() == 2 and value.shape[0] < target.shape[0] \
                        and value.shape[1] == target.shape[1]:
                    n = value.shape[0]
                    target[:n].copy_(value)
                    target[n:].copy_(value.float().mean(0, keepdim=True).to(target.dtype).expand_as(target[n:]))
                    grown[mk] = n
                elif target.shape != value.shape:
                    raise UnsupportedCheckpointError(
                        f"{path}: weight {key} has shape {tuple(value.shape)}, the config gives {tuple(target.shape)}"
                    )
                else:
                    target.copy_(value)
                filled.add(mk)
    if unexpected:
        raise UnsupportedCheckpointError(
            f"{path}: weights that do not fit the config: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # tied parameters appear under several names in the state dict
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    for names in by_storage.values():
        if any(n in filled for n in names):
            filled.update(names)
    if skip_tower:
        filled.update(k for k in own if k.startswith("vision.tower."))
    missing = sorted(set(own) - filled)
    if missing:
        hint = ""
        if any(k.startswith("connector.") for k in missing):
            hint = " (a stage-1 projector is loaded with load_projector(model, 'mm_projector.bin'))"
        raise UnsupportedCheckpointError(
            f"{path}: weights missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}{hint}"
        )
    if grown:
        log.info("new embedding rows set to the mean of the checkpoint's rows: %s", grown)


# --------------------------------------------------------------------------- public API


def load_llava_orig(path, dtype=None, vision_tower=None, tokenizer=None, template: str | None = None,
                    base=None):
    """Load an original-LLaVA directory (full or LoRA checkpoint) as an mmkit model.

    Args:
        path: the checkpoint directory (``config.json`` with ``mm_vision_tower``; weights; optional tokenizer).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (or a torch dtype).
        vision_tower: a local directory replacing the config's ``mm_vision_tower`` (a CLIP/SigLIP vision model).
        tokenizer: a tokenizer object or directory; default: the checkpoint's (LoRA: the adapter's, else the base's).
        template: conversation template; default: the LLM preset's (``chatml_direct`` for llama tokenizers with
            ``<|im_start|>``).
        base: LoRA checkpoints only: the base model directory (default: the adapter config's
            ``base_model_name_or_path``, else ``config.json``'s ``_name_or_path``).
    """
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return _load_lora(path, base, dtype=dtype, vision_tower=vision_tower, tokenizer=tokenizer,
                          template=template)
    if base is not None:
        raise ValueError(f"{path}: base= is only for LoRA checkpoints (no adapter_config.json here)")
    cfg = read_json(path / "config.json")
    tok = _load_tokenizer(tokenizer, path)
    return _build_and_load(path, cfg, [_Checkpoint(path)], tok, dtype, vision_tower, template)


def _build_and_load(path: Path, cfg: dict, sources: list, tok, dtype, vision_tower, template):
    if not is_llava_orig_config(cfg):
        raise UnsupportedCheckpointError(f"{path}: config.json has no mm_vision_tower / mm_hidden_size")
    keys = [k for s in sources for k in s.keys()]
    tower = _resolve_tower(cfg, path, vision_tower, keys)
    if not cfg.get("vocab_size"):
        raise UnsupportedCheckpointError(f"{path}: config.json has no vocab_size")
    vocab = int(cfg["vocab_size"])
    image_id, rows = _image_token(tok, vocab)
    preset = _llm_preset(cfg, path)
    if template is None:
        template = _default_template(preset, tok)
    recipe = recipe_from_orig_config(cfg, path, tower, rows, image_id, _dtype_name(dtype), template)
    # the recipe's dtype is applied after the weights are in (fp32 copy, then one cast)
    target_dtype = recipe.model.dtype
    recipe.model.dtype = "float32"
    model = build(recipe, tokenizer=tok)
    _copy_weights(model, sources, path, skip_tower=tower["pretrained"] is not None)
    if target_dtype != "float32":
        model.to(DTYPES[target_dtype])
    model.recipe.model.dtype = target_dtype
    return model


# --------------------------------------------------------------------------- stage-1 projector


def load_projector(model, path):
    """Load a stage-1 ``mm_projector.bin`` (or ``.safetensors``, or a directory holding one) into ``model``'s connector.

    Keys are taken after ``mm_projector.`` (``model.mm_projector.0.weight`` -> ``0.weight``), as the original
    ``initialize_vision_modules`` does; every connector weight must be present with the right shape.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("mm_projector.bin", "mm_projector.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no mm_projector.bin or mm_projector.safetensors")
    tensors = _read_tensors(path)
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in tensors.items() if "mm_projector." in k}
    own = {k.removeprefix("proj."): v for k, v in model.connector.state_dict().items()}  # orig's names
    if not own and tensors:
        raise UnsupportedCheckpointError(f"{path}: the model's {model.connector.kind} connector has no weights")
    hint = "" if weights else f" (no mm_projector.* keys among {list(tensors)[:4]})"
    copy_checked(own, weights, f"{path}: does not fit the model's {model.connector.kind} connector{hint}")
    return model


# --------------------------------------------------------------------------- LoRA


def _non_lora_trainables(path: Path) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` keys normalised as the original loader does: drop ``base_model.``, then a leading
    ``model.`` when the keys start with ``model.model.``."""
    for name in ("non_lora_trainables.bin", "non_lora_trainables.safetensors"):
        if (path / name).is_file():
            tensors = _read_tensors(path / name)
            break
    else:
        return {}
    tensors = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in tensors.items()}
    if any(k.startswith("model.model.") for k in tensors):
        tensors = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
    return tensors


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return _read_tensors(path / name)
    raise UnsupportedCheckpointError(f"{path}: adapter_config.json but no adapter_model.safetensors / .bin")


def _load_lora(path: Path, base, dtype, vision_tower, tokenizer, template):
    adapter_cfg = json.loads((path / "adapter_config.json").read_text())
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedCheckpointError(f"{path}: peft_type {adapter_cfg.get('peft_type')!r}: only LoRA is supported")
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    name = base or adapter_cfg.get("base_model_name_or_path") or (cfg or {}).get("_name_or_path")
    if not name:
        raise UnsupportedCheckpointError(f"{path}: a LoRA checkpoint without a base model name; pass base=DIR")
    base_dir = _local_snapshot(str(name))
    if base_dir is None:
        raise HubUnavailableError(
            f"{path}: the LoRA adapter's base model {str(name)!r} is not a local directory or in the Hugging Face "
            f"cache; download it where you have network (e.g. `hf download {name} --local-dir DIR`) and pass base=DIR"
        )
    if cfg is None:
        cfg = json.loads((base_dir / "config.json").read_text())
    if not is_llava_orig_config(cfg):
        raise UnsupportedCheckpointError(
            f"{path}: neither the LoRA directory nor the base {base_dir} has a config.json with mm_vision_tower"
        )
    sources = [_Checkpoint(base_dir)]
    trainables = _non_lora_trainables(path)
    if trainables:
        sources.append(_TensorDict(trainables))
    tok = _load_tokenizer(tokenizer, path, base_dir)
    model = _build_and_load(path, cfg, sources, tok, "float32", vision_tower, template)
    _merge_adapter(model, path, adapter_cfg)
    target = _dtype_name(dtype)
    if target != "float32":
        model.to(DTYPES[target])
        model.recipe.model.dtype = target
    return model


def _merge_adapter(model, path: Path, adapter_cfg: dict) -> None:
    """Apply a peft LoRA adapter (trained on ``LlavaLlamaForCausalLM``) to the LLM and merge it into the weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # peft is slow to import: only LoRA needs it

    weights = _adapter_weights(path)
    known = set(LoraConfig.__dataclass_fields__)
    lcfg = LoraConfig(**{k: v for k, v in adapter_cfg.items() if k in known})
    lcfg.inference_mode = True
    lcfg.base_model_name_or_path = None  # the base is already loaded (peft would warn about a rename)
    # orig names the LLM's modules exactly as transformers' *ForCausalLM does (model.layers.*, lm_head), so the
    # adapter's keys (base_model.model.model.layers.N...) apply unchanged to mmkit's llm
    outside = sorted({k for k in weights if re.match(r"base_model\.model\.model\.(vision_tower|mm_projector)", k)})
    if outside:
        raise UnsupportedCheckpointError(f"{path}: LoRA weights outside the LLM are not supported: {outside[:3]}")
    with torch.random.fork_rng(devices=[]):  # peft's random init of lora_A must not move the caller's RNG
        peft_model = get_peft_model(model.llm, lcfg)
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise UnsupportedCheckpointError(
            f"{path}: the LoRA adapter does not fit the LLM: unexpected {unexpected[:3]}, missing {missing[:3]}"
        )
    model.llm = peft_model.merge_and_unload()
    n = sum(1 for k in weights if "lora_A" in k)
    log.info("%s: merged %d LoRA pairs (r=%s, alpha=%s) into the LLM", path, n, lcfg.r, lcfg.lora_alpha)

