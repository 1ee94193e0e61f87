"""``mmkit.build(recipe)``: compose a VisionLanguageModel from the registries."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from mmkit_kernels import set_kernel_mode

from mmkit.model import VisionLanguageModel
from mmkit.processing.spec import AnyResSpec
from mmkit.recipe import Recipe, RecipeError, load_recipe
from mmkit.registry import UnknownNameError, connectors, encoders, llms, templates

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lookup(registry, name: str, key: str):
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        raise RecipeError(f"{key}: {exc}") from None


def build(recipe: str | Path | dict | Recipe, overrides=(), tokenizer=None):
    """Build a model from a recipe (path, dict or Recipe). Random init where the recipe has no ``pretrained``.
    The caller's recipe is never changed: the model keeps a resolved copy (``model.recipe``)."""
    recipe = copy.deepcopy(load_recipe(recipe, overrides))
    m = recipe.model
    build_encoder = _lookup(encoders, m.vision.name, "model.vision.name")
    build_connector = _lookup(connectors, m.connector.name, "model.connector.name")
    preset = _lookup(llms, m.llm.name, "model.llm.name")
    if m.template is not None:
        _lookup(templates, m.template, "model.template")

    for part in ("vision", "llm"):
        cfg = getattr(m, part)
        if not cfg.pretrained and not cfg.config:
            raise RecipeError(f"model.{part}: set pretrained (a hub id or local directory) or config (the fields of a "
                              "random-init model); with neither, transformers would build its default-size model")

    vision = build_encoder(m.vision)
    vision.requires_grad_(False)  # encoders are frozen by default; a stage's `trainable` unfreezes them
    if tokenizer is None:
        tokenizer = preset.build_tokenizer(m.llm, m.image_token)
    else:
        tokenizer = preset.prepare_tokenizer(tokenizer, m.image_token)
    if not m.llm.pretrained and tokenizer is not None and "vocab_size" not in m.llm.config:
        m.llm.config["vocab_size"] = len(tokenizer)  # random init: size the vocabulary to the tokenizer
    llm = preset.build_model(m.llm)
    if tokenizer is not None and len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        log.info("resizing the LLM's embeddings from %d to %d rows for added tokens",
                 llm.get_input_embeddings().weight.shape[0], len(tokenizer))
        llm.resize_token_embeddings(len(tokenizer))
    text_cfg = llm.config.get_text_config()
    connector = build_connector(vision.hidden_size, text_cfg.hidden_size, bias=m.connector.bias)

    resolve(recipe, vision, llm, tokenizer)
    apply_kernel_mode(m.kernels)
    image_spec = AnyResSpec.from_config(m.image, vision.spec.image_size, vision.spec.mean, vision.spec.std)
    model = VisionLanguageModel(recipe, vision, connector, llm, tokenizer, image_spec=image_spec)
    model.to(DTYPES[m.dtype])
    return model


def apply_kernel_mode(mode: str) -> None:
    """The recipe's ``model.kernels`` for this process; the ``MMKIT_KERNELS`` environment variable wins."""
    if not os.environ.get("MMKIT_KERNELS"):
        set_kernel_mode(None if mode == "auto" else mode)


def resolve(recipe: Recipe, vision, llm, tokenizer=None) -> None:
    """Fill the (builder's own copy of the) recipe with what was derived while building, so that it alone
    rebuilds the model."""
    m = recipe.model
    if m.image_token_id is None and tokenizer is not None:
        m.image_token_id = tokenizer.convert_tokens_to_ids(m.image_token)
    m.vision.config = vision.config_dict()
    cfg = llm.config.to_diff_dict()
    cfg["model_type"] = llm.config.model_type
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    m.llm.config = cfg
    spec = vision.spec
    m.image.image_size = m.image.image_size or spec.image_size
    m.image.mean = list(m.image.mean or spec.mean)
    m.image.std = list(m.image.std or spec.std)
    if m.template is None:
        m.template = llms.get(m.llm.name).default_template
