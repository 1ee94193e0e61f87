"""A tiny byte-level BPE tokenizer (GPT-2 style) trained in memory: multi-byte characters split across tokens."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["héllo wörld naïve café 你好世界 こんにちは 🙂🚀👍 ünïcödé ß ∑ ≥ → ✓ ą ę",
          "the quick brown fox jumps over the lazy dog ### END of turn"] * 5


@functools.cache
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """~360 tokens: the 256 bytes, some merges (whole CJK characters, emoji bytes), <unk> <s> </s>."""
    return PreTrainedTokenizerFast(tokenizer_object=_trained().__class__.from_str(_trained().to_str()),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
