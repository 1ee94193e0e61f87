"""A word-level tokenizer for small, closed-vocabulary tasks (e.g. the demo's, :mod:`mmkit.demo.tokenizer`).

Design (one id per word, Hugging Face fast tokenizer so it saves/loads with ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` offline, no custom code):

* model: ``tokenizers`` ``WordLevel``; unknown words -> ``<unk>``. No normaliser: case is kept, so the template
  words ``USER`` / ``ASSISTANT`` / ``A`` / ``The`` are vocabulary entries of their own.
* pre-tokenizer: a word is a run of letters/digits/underscore (``\\w+``); every other non-space character is a
  word of its own (``"user's"`` -> ``user ' s``, ``"USER:"`` -> ``USER :``); spaces and tabs separate words and
  are dropped.
* newlines: ``"\\n"`` is a **token** (not whitespace), like token 13 of the Llama tokenizer. The ``plain`` (stage-1)
  template ends each sample with ``"\\n"`` -- the only thing that tells a captioner where to stop -- and the
  ``vicuna_v1`` template puts ``"<image>\\n"`` in front of the first question. Each newline is its own token
  (``"\\n\\n"`` -> two tokens); a ``"\\r"`` is dropped like a space.
* special tokens ``<unk> <s> </s> <pad> <image>`` (ids 0-4 by default) are added tokens, so they are recognised
  anywhere in a text, without surrounding spaces: ``"ASSISTANT: red</s>USER: ..."`` contains ``</s>`` (eos) as
  one id and ``"<image>\\nwhat"`` contains ``<image>`` as one id.
* post-processor: ``<s> $A`` (BOS once at the start, no EOS) when ``add_special_tokens=True`` (the default), like
  LLaMA; pairs are ``<s> $A $B``.
* decoder: words are joined with single spaces, except that no space is put around a ``"\\n"`` token. So for
  text whose words and punctuation are already separated by single spaces (e.g. all demo text) ``decode(encode(x))``
  gives ``x`` back (use ``skip_special_tokens=True`` to drop ``<s>``; it also drops ``<image>`` / ``</s>``).
  Elsewhere decoding is normalised: ``"USER: hi"`` decodes to ``"USER : hi"``.

Caveat for LLaVA's original ``preprocess_v1`` masking-by-retokenisation: its ``instruction_len - 2`` assumes a
SentencePiece tokenizer whose "ASSISTANT: " trailing space fuses with the answer; with this tokenizer the net
masking must be computed directly (supervise each answer and its ``</s>``), as mmkit does.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# System prompts and role words of the vicuna_v1 / llava_v1 templates (mmkit.templates); their words are put in
# every vocabulary built with template_words=True so that rendered prompts never produce <unk>.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA's short-answer eval prompt suffix (VQAv2 / GQA style), appended after "\n" by some evaluation code.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
TEMPLATE_TEXTS = (VICUNA_V1_SYSTEM, LLAVA_V1_SYSTEM, "USER: <image>\n ASSISTANT: </s>", SHORT_ANSWER_PROMPT)

# \n is kept as a match (a token); \w+ runs and single other non-space characters are words; everything not
# matched (spaces, tabs, \r, ...) is removed.
_WORD_PATTERN = r"\n|\w+|[^\w\s]"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True)


def _decoder() -> decoders.Decoder:
    # WordPiece puts " " before every token but the first (its continuation prefix "##" never occurs: the
    # pre-tokenizer makes every "#" a word of its own); Fuse joins the pieces; the Replace steps then drop the
    # spaces around newlines.
    return decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),
            decoders.Replace("\n ", "\n"),
        ]
    )


def words_of(text: str, special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS) -> list[str]:
    """The words (tokens) of ``text`` as the tokenizer splits it, special tokens excluded."""
    pre = _pre_tokenizer()
    chunks = [text]
    for tok in special_tokens:
        chunks = [piece for chunk in chunks for piece in chunk.split(tok)]
    return [w for chunk in chunks for w, _ in pre.pre_tokenize_str(chunk)]


def build_word_tokenizer(
    texts: Iterable[str],
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
    template_words: bool = True,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    Ids are deterministic: the special tokens first, in the given order (``<unk>``=0, ``<s>``=1, ``</s>``=2,
    ``<pad>``=3, ``<image>``=4 by default), then ``"\\n"``, then the other words sorted by code point (so the ids
    do not depend on the order of ``texts``). ``template_words`` adds the words of the ``vicuna_v1`` / ``llava_v1``
    system prompts, ``USER``, ``ASSISTANT``, ``:`` and LLaVA's short-answer prompt
    ("Answer the question using a single word or phrase."). ``special_tokens`` must contain ``<unk> <s> </s> <pad>``;
    any others (``<image>``) become additional special tokens.
    """
    special_tokens = tuple(special_tokens)
    for required in ("<unk>", "<s>", "</s>", "<pad>"):
        if required not in special_tokens:
            raise ValueError(f"special_tokens must contain {required!r}, got {special_tokens}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"duplicate special tokens: {special_tokens}")
    all_texts = list(texts) + (list(TEMPLATE_TEXTS) if template_words else [])
    words = {"\n"}
    for t in all_texts:
        words.update(words_of(t, special_tokens))
    words -= set(special_tokens)
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for w in sorted(words):
        vocab[w] = len(vocab)

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = _decoder()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    bos_id = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos_id)]
    )

    named = {"<unk>": "unk_token", "<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token"}
    extra = [t for t in special_tokens if t not in named]
    kwargs = {}
    if "<image>" in extra:
        kwargs["image_token"] = "<image>"  # -> tokenizer.image_token / tokenizer.image_token_id
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=[t for t in extra if t != "<image>"] or None,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    return tok
