"""mmkit: build, train, evaluate and serve LLaVA-style vision-language models from swappable parts.

    import mmkit
    model = mmkit.load("runs/tiny/final")        # mmkit run dir, llava-hf dir or original-LLaVA dir
    model = mmkit.build("recipes/tiny.yaml")     # random init where the recipe says so
"""

from __future__ import annotations

import logging

from mmkit import registry
from mmkit._version import __version__


def build(recipe, overrides=(), tokenizer=None):
    """Compose a model from a recipe (YAML path, dict or Recipe)."""
    # heavy: torch and transformers load on the first call
    from mmkit.builder import build as _build

    return _build(recipe, overrides=overrides, tokenizer=tokenizer)


def load(path, quantize: str | None = None, device=None, **kwargs):
    """Load an mmkit, llava-hf or original-LLaVA directory (auto-detected).

    ``device`` moves the model there; ``quantize="4bit"|"8bit"`` then quantizes the LLM's linear layers with
    bitsandbytes (see ``mmkit.quant``) and logs the memory before and after.
    """
    # heavy: torch and transformers load on the first call, so `import mmkit` and every --help stay fast
    from mmkit.formats.load import load as _load

    model = _load(path, **kwargs)
    if device is not None:
        model.to(device)
    if quantize is not None:
        from mmkit.quant import quantize_llm  # needs bitsandbytes (optional): only when asked to quantize

        logging.getLogger("mmkit").info("%s", quantize_llm(model, quantize))
    return model


def load_recipe(path_or_data, overrides=()):
    """Read a recipe (YAML path, dict or Recipe) with ``key.path=value`` overrides; see ``mmkit.recipe``."""
    from mmkit.recipe import load_recipe as _load_recipe  # keeps `import mmkit` to the registry alone

    return _load_recipe(path_or_data, overrides)


__all__ = ["build", "load", "load_recipe", "registry", "__version__"]
