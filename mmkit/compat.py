"""Switches for the dependency APIs that were renamed inside the ranges pyproject.toml declares.

Each switch picks the current name where the installed version has it, so mmkit never calls a
deprecated API; the old name is used only on the older versions that lack the new one. The
version is read from the installed distribution, so this module imports nothing heavy.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import version
from typing import Any


@functools.cache
def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    found = re.match(r"(\d+)\.(\d+)", version("transformers"))
    if found is None:
        raise RuntimeError(f"cannot read the transformers version {version('transformers')!r}")
    return int(found[1]), int(found[2])


def cache_name() -> str:
    # transformers 5.24 renamed the models' `past_key_values` argument and output field to `cache`
    return "cache" if transformers_version() >= (5, 24) else "past_key_values"


def llm_cache_kwargs(cache: Any) -> dict[str, Any]:
    """The KV-cache keyword argument of a transformers model call, under this version's name."""
    return {cache_name(): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a transformers model returned (None when it returned none)."""
    return getattr(out, cache_name(), None)


def enable_activation_checkpointing(llm: Any) -> bool:
    """Turn on non-reentrant activation checkpointing of a transformers model; False if it has none."""
    # transformers 5.23 renamed gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) to
    # activation_checkpointing_enable(activation_checkpointing_kwargs=...)
    new = transformers_version() >= (5, 23)
    enable = getattr(llm, "activation_checkpointing_enable" if new else "gradient_checkpointing_enable", None)
    if enable is None:
        return False
    enable(**{"activation_checkpointing_kwargs" if new else "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    return True
