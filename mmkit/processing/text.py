"""Conversation -> token ids and labels, built segment by segment, never by splitting a rendered string and
re-tokenizing it (which is how LLaVA-derived code can silently end up with a tokenization mismatch and loss 0).

A template renders the conversation as segments (``mmkit.templates.Segment``): text plus a
``supervised`` flag. Each segment is tokenized on its own and the ids are concatenated; a
segment's labels are its ids when supervised and -100 otherwise. Nothing is ever recovered by
splitting a rendered string, so the mask cannot drift from the ids ("tokenization mismatch").

Images. Inside a segment the text is split on ``image_token`` (as ``tokenizer_image_token`` does)
and the k-th placeholder of the conversation becomes ``image_token_counts[k]`` copies of
``image_token_id`` (label -100): image tokens are expanded here, before the model
(so lengths, truncation and padding are all decided in the data pipeline).

BOS. If the tokenizer adds a BOS by itself (Llama, Vicuna, Mistral, Llama-3), it is emitted once,
first, label -100 -- unless the rendered text already starts with it (``llama_3`` writes
``<|begin_of_text|>``; chat templates usually write ``bos_token``). Segments are tokenized with
``add_special_tokens=False``, so there is never a BOS (or an EOS) inside. Qwen has no BOS: nothing
is added.

SentencePiece dummy prefix. Llama/Mistral tokenizers put a "▁" before the start of any text they
tokenize, so naive per-segment tokenization would add a spurious "▁" at every segment boundary.
mmkit instead makes the concatenated ids equal to what the original ``tokenizer_image_token``
gives for the whole rendered prompt (the ids LLaVA checkpoints were trained on):

* a text chunk gets the dummy prefix where the tokenizer itself would put one: at the start of
  the prompt, after an image placeholder (each chunk between images is tokenized on its own, as in
  the original: ``"<image>\\nWhat"`` -> ``<image> ▁ \\n What``), and after a special/added token
  if the tokenizer does that (legacy Llama: ``</s>USER`` -> ``</s> ▁US ER``; non-legacy: ``US ER``);
* elsewhere a segment continues the previous text without a prefix;
* a single space between two segments (``"ASSISTANT: " | "cat</s>"``) is *folded*: it is dropped
  from the first segment and the next segment's dummy prefix stands for it. So the answer starts
  with ``▁cat`` exactly as in the full-string tokenization, and the supervised ids
  ``[▁cat, </s>]`` decode to ``"cat</s>"`` -- the answer plus the end-of-turn token.

Byte-level BPE tokenizers (Qwen, Llama-3) have no dummy prefix; a space between two unsupervised
segments is moved to the front of the second (``"Q" | " ASSISTANT: "``), matching the full-string
tokenization. A space between an unsupervised header and a supervised answer stays in the header
(its own token), so supervised tokens still decode to exactly the answer; this only happens with
space-separated templates (``vicuna_v1``/``llava_v1``/``mistral_instruct``) on byte-level
tokenizers, and ``build_inference_ids`` reproduces the same header for generation.

Truncation (``max_length``, counted after image expansion, BOS included) drops whole trailing
exchanges (user turn + answer), so an image's tokens are never cut; if even the first exchange
does not fit, ConversationError("too long ...") is raised so a dataset can count and skip it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tokenizers import Tokenizer

from mmkit.templates import (
    DEFAULT_IMAGE_TOKEN,
    ConversationError,
    Segment,
    Template,
    get_template,
    normalize_conversation,
)

__all__ = ["ConversationError", "IGNORE_INDEX", "tokenize_conversation", "build_inference_ids", "tokenize_segments"]

IGNORE_INDEX = -100

_PREFIX, _CONTINUE = "prefix", "continue"


# --------------------------------------------------------------------------------------------
# what we need to know about a tokenizer (probed once, cached)
# --------------------------------------------------------------------------------------------


@dataclass
class _TokInfo:
    size: int
    bos_id: int | None  # emitted once at the start (None: the tokenizer adds no BOS)
    bos_text: str | None
    dummy_prefix: bool  # SentencePiece-style "▁" before the start of a text
    prefix_after_added: bool  # ... also right after a special/added token (legacy Llama)
    added: tuple[str, ...]  # added-token strings, longest first
    cont: Any  # tokenizers.Tokenizer without the dummy prefix, or None


_INFO: "weakref.WeakKeyDictionary[Any, _TokInfo]" = weakref.WeakKeyDictionary()


def _enc(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _no_prefix_backend(tok: Any) -> Any:
    """A copy of a fast tokenizer's backend that never prepends the SentencePiece "▁"."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        cfg = json.loads(backend.to_str())
    except Exception:
        return None

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [x for x in (fix(v) for v in node) if x is not None]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "Prepend":  # old Llama tokenizer.json: normalizer Prepend("▁")
            return None
        if kind == "Metaspace":
            node["prepend_scheme"] = "never"
            if "add_prefix_space" in node:
                node["add_prefix_space"] = False
        if kind == "ByteLevel" and node.get("add_prefix_space"):
            node["add_prefix_space"] = False
        return {k: fix(v) for k, v in node.items()}

    cfg["normalizer"] = fix(cfg.get("normalizer"))
    cfg["pre_tokenizer"] = fix(cfg.get("pre_tokenizer"))
    cfg["post_processor"] = None
    try:
        cont = Tokenizer.from_str(json.dumps(cfg))
        # sanity: continuing with an explicit space must equal the prefixed start
        if cont.encode(" a", add_special_tokens=False).ids != _enc(tok, "a"):
            return None
        if cont.encode("a", add_special_tokens=False).ids == _enc(tok, "a"):
            return None
    except Exception:
        return None
    return cont


def _added_strings(tok: Any) -> tuple[str, ...]:
    found: set[str] = set()
    for t in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if str(t):
            found.add(str(t))
    for t in getattr(tok, "all_special_tokens", None) or []:
        if t:
            found.add(str(t))
    return tuple(sorted(found, key=len, reverse=True))


def _tok_info(tok: Any) -> _TokInfo:
    size = len(tok)
    try:
        info = _INFO.get(tok)
    except TypeError:
        info = None
    if info is not None and info.size == size:
        return info
    plain = _enc(tok, "a")
    dummy_prefix = plain == _enc(tok, " a")
    bos_id = getattr(tok, "bos_token_id", None)
    with_special = list(tok("a")["input_ids"])
    adds_bos = bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    added = _added_strings(tok)
    prefix_after_added = True
    if dummy_prefix:
        probe = next((s for s in (getattr(tok, "eos_token", None), *added) if s and len(_enc(tok, s)) == 1), None)
        if probe is not None:
            prefix_after_added = _enc(tok, probe + "a")[1:] == plain
    info = _TokInfo(
        size=size,
        bos_id=bos_id if adds_bos else None,
        bos_text=str(tok.bos_token) if adds_bos else None,
        dummy_prefix=dummy_prefix,
        prefix_after_added=prefix_after_added,
        added=added,
        cont=_no_prefix_backend(tok) if dummy_prefix else None,
    )
    try:
        _INFO[tok] = info
    except TypeError:
        pass
    return info


def _encode_chunk(tok: Any, info: _TokInfo, text: str, mode: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added), with or without the dummy prefix."""
    if not text:
        return []
    if mode == _PREFIX or not info.dummy_prefix or info.cont is None:
        return _enc(tok, text)
    # continuation: no prefix before the first added token; after it, the tokenizer's own rules
    cut = len(text)
    for s in info.added:
        pos = text.find(s)
        if 0 <= pos < cut:
            cut = pos
    head = list(info.cont.encode(text[:cut], add_special_tokens=False).ids) if cut else []
    return head + (_enc(tok, text[cut:]) if cut < len(text) else [])


# --------------------------------------------------------------------------------------------
# segments -> ids, labels
# --------------------------------------------------------------------------------------------


@dataclass
class _Tokenized:
    input_ids: list[int]
    labels: list[int]
    segment: list[int]  # per token: index of its segment (-1: the BOS)
    num_images: int


def _fold_spaces(info: _TokInfo, segments: list[Segment], image_token: str) -> tuple[list[str], list[bool]]:
    """Resolve single spaces at segment boundaries (see the module docstring)."""
    texts = [s.text for s in segments]
    folded = [False] * len(texts)
    for i in range(len(texts) - 1):
        t, nxt = texts[i], texts[i + 1]
        if segments[i].supervised or not t.endswith(" ") or t.endswith("  "):
            continue
        if not nxt or nxt[0].isspace() or nxt.startswith(image_token):
            continue
        if info.dummy_prefix:
            texts[i] = t[:-1]
            folded[i + 1] = True
        elif not segments[i + 1].supervised:
            texts[i] = t[:-1]
            texts[i + 1] = " " + nxt
    return texts, folded


def tokenize_segments(
    tokenizer: Any,
    segments: Sequence[Segment],
    *,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    image_token_id: int | None = None,
    image_token_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Tokenize rendered segments: ``{"input_ids", "labels", "num_images"}`` (no truncation)."""
    out = _tokenize(tokenizer, [s for s in segments if s.text], image_token, image_token_id, image_token_counts)
    return {"input_ids": out.input_ids, "labels": out.labels, "num_images": out.num_images}


def _resolve_images(tok: Any, segments: Sequence[Segment], image_token: str, image_token_id: int | None,
                    image_token_counts: Sequence[int] | None) -> tuple[int | None, list[int]]:
    n = sum(s.text.count(image_token) for s in segments)
    counts = [1] * n if image_token_counts is None else list(image_token_counts)
    if len(counts) != n:
        raise ConversationError(
            f"the conversation has {n} {image_token} placeholder(s) but {len(counts)} image token count(s) were given"
        )
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConversationError(f"image token counts must be positive integers, got {counts}")
    if n and image_token_id is None:
        image_token_id = tok.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == getattr(tok, "unk_token_id", object()):
            raise ConversationError(f"the tokenizer has no {image_token!r} token; pass image_token_id=")
    return image_token_id, counts


def _tokenize(tok: Any, segments: list[Segment], image_token: str, image_token_id: int | None,
              image_token_counts: Sequence[int] | None) -> _Tokenized:
    info = _tok_info(tok)
    image_token_id, counts = _resolve_images(tok, segments, image_token, image_token_id, image_token_counts)
    texts, folded = _fold_spaces(info, segments, image_token)
    ids: list[int] = []
    labels: list[int] = []
    seg_of: list[int] = []
    if info.bos_id is not None and not (texts and texts[0].startswith(info.bos_text)):
        ids.append(info.bos_id)
        labels.append(IGNORE_INDEX)
        seg_of.append(-1)
    prev = "start"
    n_img = 0
    for si, (seg, text, fold) in enumerate(zip(segments, texts, folded)):
        if fold:
            prev = "folded"
        for k, chunk in enumerate(text.split(image_token)):
            if k > 0:
                c = counts[n_img]
                n_img += 1
                ids += [image_token_id] * c
                labels += [IGNORE_INDEX] * c
                seg_of += [si] * c
                prev = "image"
            if not chunk:
                continue
            if prev in ("start", "image", "folded") or (prev == "added" and info.prefix_after_added):
                mode = _PREFIX
            else:
                mode = _CONTINUE
            piece = _encode_chunk(tok, info, chunk, mode)
            ids += piece
            labels += piece if seg.supervised else [IGNORE_INDEX] * len(piece)
            seg_of += [si] * len(piece)
            prev = "added" if any(chunk.endswith(s) for s in info.added) else "text"
    return _Tokenized(ids, labels, seg_of, n_img)


def tokenize_conversation(
    tokenizer: Any,
    template: "str | Template",
    conversations: Sequence[Mapping[str, Any]],
    image_token: str = DEFAULT_IMAGE_TOKEN,
    image_token_id: int | None = None,
    image_token_counts: Sequence[int] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Token ids and labels of one training conversation.

    ``conversations``: LLaVA turns ``[{"from": "human"|"gpt", "value": str}, ...]`` (or
    ``role``/``content``; an optional leading system turn). ``image_token_counts[k]``: how many
    tokens the k-th ``<image>`` expands to (default: 1 each); ``image_token_id`` defaults to the
    tokenizer's id of ``image_token``.

    Returns ``{"input_ids": list[int], "labels": list[int], "num_images": int}``; labels are the
    ids on the assistant answers and their end-of-turn token, -100 elsewhere. ``num_images`` is how
    many images are still referenced after truncation (the first ``num_images`` of the sample).
    Raises :class:`ConversationError` (a ValueError) for bad roles, empty answers, a placeholder
    count that differs from ``len(image_token_counts)``, or a first exchange longer than ``max_length``.
    """
    tpl = get_template(template)
    segments = [s for s in tpl.segments(conversations, tokenizer=tokenizer, image_token=image_token) if s.text]
    out = _tokenize(tokenizer, segments, image_token, image_token_id, image_token_counts)
    if max_length is not None and len(out.input_ids) > max_length:
        ex_len: dict[int, int] = {}
        for si in out.segment:
            e = _exchange(segments[si]) if si >= 0 else 0
            ex_len[e] = ex_len.get(e, 0) + 1
        keep, total = 0, 0
        for e in sorted(ex_len):
            if total + ex_len[e] > max_length:
                break
            total += ex_len[e]
            keep = e + 1
        while True:
            if keep == 0:
                raise ConversationError(
                    f"too long: the first exchange takes {ex_len.get(0, 0)} tokens (images expanded), "
                    f"more than max_length={max_length}"
                )
            kept = [s for s in segments if _exchange(s) < keep]
            n_img = sum(s.text.count(image_token) for s in kept)
            counts = None if image_token_counts is None else list(image_token_counts)[:n_img]
            out = _tokenize(tokenizer, kept, image_token, image_token_id, counts)
            if len(out.input_ids) <= max_length:
                break
            keep -= 1
    return {"input_ids": out.input_ids, "labels": out.labels, "num_images": out.num_images}


def _exchange(seg: Segment) -> int:
    return max(seg.turn, 0) // 2


_PROBE_ANSWER = "probe"


def build_inference_ids(
    tokenizer: Any,
    template: "str | Template",
    messages: Sequence[Mapping[str, Any]],
    image_token_counts: Sequence[int] | None = None,
    image_token_id: int | None = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> list[int]:
    """Prompt ids for generation: the chat (ending with a user turn) plus the open assistant slot.

    The ids are exactly the prefix that :func:`tokenize_conversation` produces for the same chat
    followed by an answer, i.e. what the model saw in training right before the answer.
    """
    tpl = get_template(template)
    _, msgs = normalize_conversation(messages, image_token=image_token)
    if msgs[-1]["role"] != "user":
        raise ConversationError("a prompt must end with a user turn")
    probe = [dict(m) for m in messages] + [{"role": "assistant", "content": _PROBE_ANSWER}]
    # earlier answers may be empty in a chat (the model said nothing); only training data must have answers
    segments = [s for s in tpl.segments(probe, tokenizer=tokenizer, image_token=image_token, allow_empty_answers=True)
                if s.text]
    answer_at = max(i for i, s in enumerate(segments) if s.supervised)
    # tokenize with the probe answer present (it decides the space folding), then cut before it
    out = _tokenize(tokenizer, segments, image_token, image_token_id, image_token_counts)
    cut = out.segment.index(answer_at)
    return out.input_ids[:cut]
