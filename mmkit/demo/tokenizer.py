"""The demo's tokenizer (``model.llm.tokenizer: builtin:shapes``): one id per word of the shapes task.

Registered in ``mmkit.registry.tokenizers`` through the entry point ``mmkit.tokenizers: shapes`` in
mmkit's pyproject.toml.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from mmkit.data.tokenizer import build_word_tokenizer
from mmkit.demo import shapes


def shapes_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Every word :mod:`mmkit.demo.shapes` can emit plus the template words.

    Deterministic ids (same vocabulary and ids on every call and machine).
    """
    return build_word_tokenizer(shapes.vocabulary(), model_max_length=model_max_length)


__all__ = ["shapes_tokenizer"]
