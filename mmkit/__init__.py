"""mmkit: build, train, evaluate and serve LLaVA-style vision-language models from swappable parts.

    import mmkit
    model = mmkit.load("runs/tiny/final")        # mmkit run dir, llava-hf dir or original-LLaVA dir
    model = mmkit.build("recipes/tiny.yaml")     # random init where the recipe says so
"""

from __future__ import annotations

__version__ = "0.1.0"

from mmkit import registry  # noqa: E402


def build(recipe, overrides=(), tokenizer=None):
    """Compose a model from a recipe (YAML path, dict or Recipe)."""
    from mmkit.builder import build as _build

    return _build(recipe, overrides=overrides, tokenizer=tokenizer)


def load(path, **kwargs):
    """Load an mmkit, llava-hf or original-LLaVA directory (auto-detected)."""
    from mmkit.formats import load as _load

    return _load(path, **kwargs)


def load_recipe(path_or_data, overrides=()):
    from mmkit.recipe import load_recipe as _load_recipe

    return _load_recipe(path_or_data, overrides)


__all__ = ["build", "load", "load_recipe", "registry", "__version__"]
