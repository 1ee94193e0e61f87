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

Speed. The rules above decide, for every text chunk, the string to encode and how (with the tokenizer's
own start rules, or continuing without a dummy prefix); both paths share them. ``reference=True`` then
calls the tokenizer once per chunk. The default path calls it once per conversation: every chunk still to
encode goes into one batched call to the tokenizer's Rust backend, and chunks seen before (the template's
system prompt and role headers, repeated short answers) come from a small per-tokenizer cache. For a
SentencePiece BPE tokenizer (Metaspace pre-tokenizer, no normalizer) whose merges never join across the
start of a word, a chunk's ids are its words' ids, so words are cached too and only unseen words are
encoded (joined into one text, cut apart by an added token). Every shortcut is taken only where probes at
first use show the tokenizer behaves as it assumes, and gives exactly the per-chunk path's ids (tests
compare the two on every template and tokenizer flavour). A tokenizer is assumed not to be reconfigured in
place after its first use, except by adding tokens (which resets what was learnt about it).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from itertools import accumulate, chain
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
    fast: "_Fast | None" = None  # what the batched path adds (built on its first use)


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
    segment: list[int] | None  # per token: index of its segment (-1: the BOS), or None when ``runs`` is given
    num_images: int
    runs: list[tuple[int, int]] | None = None  # (segment, token count) of consecutive tokens, in order

    def segment_runs(self) -> list[tuple[int, int]]:
        """(segment, token count) of the consecutive tokens of each segment, in order."""
        if self.runs is not None:
            return self.runs
        runs: list[tuple[int, int]] = []
        for si in self.segment:
            if runs and runs[-1][0] == si:
                runs[-1] = (si, runs[-1][1] + 1)
            else:
                runs.append((si, 1))
        return runs


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
    reference: bool = False,
) -> dict[str, Any]:
    """Tokenize rendered segments: ``{"input_ids", "labels", "num_images"}`` (no truncation).

    ``reference=True``: one tokenizer call per chunk (the slow path the default one is tested against).
    """
    run = _tokenize_reference if reference else _tokenize
    out = run(tokenizer, [s for s in segments if s.text], image_token, image_token_id, image_token_counts)
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


def _tokenize_reference(tok: Any, segments: list[Segment], image_token: str, image_token_id: int | None,
                        image_token_counts: Sequence[int] | None, memo: dict | None = None) -> _Tokenized:
    """The per-chunk path (one tokenizer call per text chunk): what ``_tokenize`` must equal exactly.
    (``memo`` is ``_tokenize``'s and unused here: this path encodes every chunk every time.)"""
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


# --------------------------------------------------------------------------------------------
# the batched path: the same chunks, all of a conversation encoded in one call
# --------------------------------------------------------------------------------------------
#
# Keys of the chunks to encode: (_MAIN, text) with the tokenizer's own start rules, (_CONT, text) continuing
# without a dummy prefix (what _encode_chunk does in either mode), or a plain str ``w``: the SentencePiece word
# "▁" + w (see _Words), whose ids are the same wherever it occurs.

_MAIN, _CONT = 0, 1  # key kinds: _encode_chunk's modes _PREFIX and _CONTINUE
_CHUNK_CACHE_TEXT = 256  # longer chunks (answers, descriptions) rarely repeat: not cached
_WORD_CACHE_TEXT = 64  # a longer "word" is a run of text without spaces (a URL, CJK): not cached


class _Cache:
    """chunk -> ids (a tuple), two generations: an entry seen again moves to ``old`` (kept while it has room); ``young``
    is emptied when full. The template's fixed pieces and frequent words repeat, so they end up in ``old``."""

    __slots__ = ("size", "young", "old")

    def __init__(self, size: int) -> None:
        self.size = size
        self.young: dict = {}
        self.old: dict = {}

    def get(self, key: Any) -> tuple[int, ...] | None:
        ids = self.old.get(key)
        if ids is None:
            ids = self.young.get(key)
            if ids is not None and len(self.old) < self.size:
                self.old[key] = ids
        return ids

    def put(self, key: Any, ids: tuple[int, ...]) -> None:
        if len(self.young) >= self.size:
            self.young.clear()
        self.young[key] = ids

    def clear(self) -> None:
        self.young.clear()
        self.old.clear()


@dataclass
class _Words:
    """A SentencePiece BPE (Metaspace, no normalizer) whose ids are the concatenation of its words' ids.

    Metaspace writes "▁" for every space (and the dummy prefix), then BPE merges the whole chunk. Where no
    merge joins a symbol ending in another character to one starting with "▁" (SentencePiece pieces never hold
    a "▁" after another character), nothing is ever merged across the start of a word ``▁*[^▁]+``, so each word
    can be encoded on its own and remembered: a chunk costs a split on spaces and dict lookups.
    """

    rep: str  # "▁"
    pattern: Any  # one word: a run of "▁" and what follows up to the next "▁" (or a trailing run of "▁")
    cache: _Cache  # key w -> ids of rep + w
    sep: str | None  # an added token that cuts a text into independently encoded parts (see _separates)
    sep_id: int | None


@dataclass
class _Fast:
    backend: bool  # a Hugging Face fast tokenizer: its Rust backend is called directly
    added_re: Any  # alternation of the added-token strings (leftmost match = the first one in a text), or None
    added_first: str | None  # the added tokens' first character when they all share it (a cheap pre-scan), else None
    anchor: str | None  # an added token after which the tokenizer continues exactly like ``cont`` (non-legacy)
    anchor_id: int | None
    words: _Words | None
    chunks: _Cache
    image_runs: dict = field(default_factory=dict)  # (image token id, count) -> that many ids (a tuple)


def _backend(tok: Any) -> Any:
    """The fast tokenizer's Rust backend, or None (a Python tokenizer: encoded through its own ``__call__``)."""
    try:
        be = tok.backend_tokenizer
    except (AttributeError, NotImplementedError):
        return None
    return be if callable(getattr(be, "encode_batch", None)) else None


def _fast_info(tok: Any, info: _TokInfo) -> _Fast:
    """Probe what the batched path may use for this tokenizer (once; published on ``info`` when complete)."""
    backend = _backend(tok)
    added = info.added
    anchor = None
    if info.cont is not None and not info.prefix_after_added:
        anchor = _find_anchor(tok, added, info.cont)
    fast = _Fast(
        backend=backend is not None,
        added_re=re.compile("|".join(re.escape(a) for a in added)) if added else None,
        added_first=added[0][0] if added and len({a[0] for a in added}) == 1 else None,
        anchor=anchor,
        anchor_id=_enc(tok, anchor)[0] if anchor is not None else None,
        words=None,
        chunks=_Cache(4096),
    )
    if backend is not None and info.cont is not None:
        fast.words = _find_words(tok, info, fast, backend)
    info.fast = fast
    return fast


# leading/trailing/double spaces, newlines, tabs, non-ASCII, a literal "▁"
_PROBES = ("a", " a", "  a", "a b  c", "\na b", "a\n", " \n\n a", "é ü 中文", "USER: x ", "a \t b", "x ▁y", "  ")


def _separates(tok: Any, a: str, added: tuple[str, ...]) -> bool:
    """In ``t1 + a + t2 + a + ...`` (texts without added tokens) nothing but ``a`` itself can match an added
    token: no other added token contains ``a`` or overlaps it at either end; and ``a`` is one id (not unk)."""
    if not a or a == getattr(tok, "unk_token", None) or len(_enc(tok, a)) != 1:
        return False
    return all(o == a or (a not in o and not any(o.endswith(a[:k]) or o.startswith(a[-k:]) for k in range(1, len(a))))
               for o in added)


def _find_anchor(tok: Any, added: tuple[str, ...], cont: Any) -> str | None:
    """An added token ``A`` with ``tok(A + x) == [A] + cont(x)`` (a non-legacy SentencePiece tokenizer puts no
    dummy prefix after an added token), so that continuation chunks can ride in the same batched call."""
    eos = getattr(tok, "eos_token", None)
    for a in ([str(eos)] if eos else []) + list(added):
        if not _separates(tok, a, added):
            continue
        head = _enc(tok, a)
        try:
            ok = all(_enc(tok, a + x) == head + list(cont.encode(x, add_special_tokens=False).ids) for x in _PROBES)
        except Exception:
            ok = False
        if ok:
            return a
    return None


def _find_words(tok: Any, info: _TokInfo, fast: _Fast, backend: Any) -> _Words | None:
    """A _Words for this tokenizer if its pipeline is exactly Metaspace + BPE as described there, else None."""
    try:
        cfg = json.loads(backend.to_str())
    except Exception:
        return None
    pre = cfg.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    model = cfg.get("model") or {}
    rep = pre.get("replacement")
    if (cfg.get("normalizer") is not None or pre.get("type") != "Metaspace"
            or pre.get("prepend_scheme") not in ("always", "first")
            or not isinstance(rep, str) or len(rep) != 1 or rep.isspace()
            or model.get("type") != "BPE" or model.get("dropout") or model.get("ignore_merges")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or rep not in (model.get("vocab") or {})):
        return None
    if not pre.get("split"):  # split=True already cuts before every "▁"
        for m in model.get("merges") or []:
            left, right = m if isinstance(m, list) else (m.split(" ") + [""])[:2]
            if not left or not right or (left[-1] != rep and right[0] == rep):
                return None
    for t in cfg.get("added_tokens") or []:  # these look at the spaces around a token or could match a "▁"
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or rep in t.get("content", ""):
            return None
    sep = fast.anchor or next((a for a in [str(getattr(tok, "eos_token", None) or ""), *info.added]
                               if _separates(tok, a, info.added)), None)
    words = _Words(rep=rep, pattern=re.compile(f"{re.escape(rep)}*[^{re.escape(rep)}]+|{re.escape(rep)}+"),
                   cache=_Cache(1 << 15), sep=sep, sep_id=_enc(tok, sep)[0] if sep is not None else None)
    fast.words = words  # _encode_keys reads it
    try:
        for x in _PROBES:  # each probe on its own, then all of them in one _encode_keys (joined texts)
            for mode in (_PREFIX, _CONTINUE):
                got = [i for ids in _encode_keys(tok, info, fast, _flat_keys(words, x, mode == _PREFIX)) for i in ids]
                if got != _encode_chunk(tok, info, x, mode):
                    return None
        keys = list(dict.fromkeys(k for x in _PROBES for mode in (True, False) for k in _flat_keys(words, x, mode)))
        if _encode_keys(tok, info, fast, keys) != [_encode_key_alone(tok, info, words, k) for k in keys]:
            return None
    except Exception:
        return None
    finally:
        fast.words = None
    return words


def _flat_keys(words: _Words, text: str, prefix: bool) -> list:
    first, keys = _word_keys(words, text, prefix)
    return ([first] if first is not None else []) + keys


def _encode_key_alone(tok: Any, info: _TokInfo, words: _Words | None, key: Any) -> list[int]:
    """One key's ids the per-chunk way (what a joined encoding must give for it)."""
    if type(key) is str:
        return _enc(tok, words.rep + key)
    return _encode_chunk(tok, info, key[1], _PREFIX if key[0] == _MAIN else _CONTINUE)


def _word_keys(words: _Words, text: str, prefix: bool) -> tuple[tuple[int, str] | None, list[str]]:
    """``text`` (non-empty, no added tokens in it) as Metaspace sees it, cut into words: a first word without
    "▁" (a continuation: a (_CONT, text) key) or None, and the keys ``w`` of the words "▁" + w that follow."""
    r = words.rep
    if r in text or "  " in text:  # a run of "▁" belongs to the word after it
        s = text.replace(" ", r)
        if prefix and not s.startswith(r):
            s = r + s
        found = words.pattern.findall(s)
        if found[0][0] == r:
            return None, [w[1:] for w in found]
        return (_CONT, found[0]), [w[1:] for w in found[1:]]
    # single spaces only: the words are what lies between them (kept as they are: no "▁" written)
    keys = text.split(" ")
    if text[0] == " ":
        del keys[0]
        return None, keys
    if prefix:
        return None, keys
    first = keys.pop(0)
    return (_CONT, first), keys


def _encode_batch(tok: Any, fast: _Fast, texts: list[str]) -> list[list[int]]:
    """``[tok(t, add_special_tokens=False)["input_ids"] for t in texts]`` in one call."""
    be = _backend(tok) if fast.backend else None
    # transformers' TokenizersBackend._encode_plus (tokenization_utils_tokenizers.py) calls the backend's
    # encode_batch after resetting padding/truncation and syncing encode_special_tokens: call the backend
    # directly when those are already as it would set them
    if (be is not None and be.truncation is None and be.padding is None
            and be.encode_special_tokens == bool(getattr(tok, "split_special_tokens", False))):
        fn = getattr(be, "encode_batch_fast", None) or be.encode_batch  # _fast: the same ids, no offsets
        return [e.ids for e in fn(texts, add_special_tokens=False)]
    return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def _encode_keys(tok: Any, info: _TokInfo, fast: _Fast, keys: list) -> list[list[int]]:
    """Ids of distinct keys, in one batched call: each (_MAIN, text) is a text of the batch; the words, and the
    continuations behind the anchor, are joined into one text each, cut by an added token (``_Words.sep``:
    the tokenizer encodes what lies between added tokens independently). Only continuations of a legacy
    SentencePiece tokenizer (no anchor) need a second call, to the prefix-less copy ``cont``."""
    words = fast.words
    sep, sep_id = (words.sep, words.sep_id) if words is not None else (None, None)
    anchor = fast.anchor
    # requests: [use cont, text, key positions, id that cuts the result into parts (or None), it leads the text]
    reqs: list[list] = []
    said: list[tuple[int, str]] = []  # "▁" words
    cont: list[tuple[int, str]] = []  # continuations
    for i, key in enumerate(keys):
        if type(key) is str:
            said.append((i, words.rep + key))
        elif key[0] == _CONT:
            cont.append((i, key[1]))
        else:
            reqs.append([False, key[1], [i], None, False])
    if said:
        if sep is not None:
            reqs.append([False, sep.join(t for _, t in said), [i for i, _ in said], sep_id, False])
        else:
            reqs += [[False, t, [i], None, False] for i, t in said]
    if cont:
        if anchor is not None:  # the tokenizer puts no dummy prefix after an added token (non-legacy)
            texts = [anchor + anchor.join(t for _, t in cont)] if sep is not None else [anchor + t for _, t in cont]
            groups = [[i for i, _ in cont]] if sep is not None else [[i] for i, _ in cont]
            reqs += [[False, t, g, fast.anchor_id, True] for t, g in zip(texts, groups)]
        elif sep is not None:
            reqs.append([True, sep.join(t for _, t in cont), [i for i, _ in cont], sep_id, False])
        else:
            reqs += [[True, t, [i], None, False] for i, t in cont]
    main_texts = [r[1] for r in reqs if not r[0]]
    cont_texts = [r[1] for r in reqs if r[0]]
    main_ids = iter(_encode_batch(tok, fast, main_texts) if main_texts else ())
    cont_ids = iter(())
    if cont_texts:
        fn = getattr(info.cont, "encode_batch_fast", None) or info.cont.encode_batch
        cont_ids = iter([e.ids for e in fn(cont_texts, add_special_tokens=False)])
    out: list = [None] * len(keys)
    for use_cont, _, positions, cut, leads in reqs:
        ids = next(cont_ids) if use_cont else next(main_ids)
        if cut is None:
            out[positions[0]] = ids
            continue
        parts = _cut(ids, cut, leads)
        if parts is None or len(parts) != len(positions):  # the probes say this cannot happen; stay exact
            parts = [_encode_key_alone(tok, info, words, keys[i]) for i in positions]
        for i, part in zip(positions, parts):
            out[i] = part
    return out


def _cut(ids: list[int], cut: int, leads: bool) -> list[list[int]] | None:
    """``ids`` of ``[cut] + a + [cut] + b`` (``leads``) or ``a + [cut] + b`` -> ``[a, b]``."""
    if leads:
        if ids[:1] != [cut]:
            return None
        ids = ids[1:]
    parts, start = [], 0
    find = ids.index
    while True:
        try:
            at = find(cut, start)
        except ValueError:
            parts.append(ids[start:])
            return parts
        parts.append(ids[start:at])
        start = at + 1


def _tokenize(tok: Any, segments: list[Segment], image_token: str, image_token_id: int | None,
              image_token_counts: Sequence[int] | None, memo: dict | None = None) -> _Tokenized:
    """``_tokenize_reference`` with all of the conversation's chunks encoded in one batched call.

    The same state machine picks each chunk's text and mode. The conversation becomes one flat list of parts
    (the ids of a word, of a chunk or of an image's run of tokens) looked up in the tokenizer's caches in C-level
    passes; what is still unknown is encoded at once; then the ids are the parts' concatenation and the labels
    are -100 with the supervised spans copied in. ``memo`` (key -> ids) is shared by the re-tokenizations of
    one conversation's truncation, so those encode nothing new.
    """
    if getattr(tok, "split_special_tokens", False):  # added tokens are text then: none of the shortcuts holds
        return _tokenize_reference(tok, segments, image_token, image_token_id, image_token_counts)
    info = _tok_info(tok)
    fast = info.fast or _fast_info(tok, info)
    image_token_id, counts = _resolve_images(tok, segments, image_token, image_token_id, image_token_counts)
    texts, folded = _fold_spaces(info, segments, image_token)
    added, added_re, added_first = info.added, fast.added_re, fast.added_first
    words = fast.words
    rep = words.rep if words is not None else None
    plain = not info.dummy_prefix or info.cont is None  # every chunk is encoded with the tokenizer's own rules
    prefix_after_added = info.prefix_after_added
    chunk_cache = fast.chunks
    frequent_chunk = chunk_cache.old.get
    word_cache = words.cache if words is not None else None
    frequent_word = word_cache.old.get if word_cache is not None else None

    flat: list = []  # per part: its ids (a tuple), or None while not known yet
    keys: list = []  # per part: its key (None for a BOS or an image run)
    # per span of parts: (segment, supervised (None: an image's tokens), first part, end part)
    spans: list[tuple] = []
    if info.bos_id is not None and not (texts and texts[0].startswith(info.bos_text)):
        flat.append((info.bos_id,))
        keys.append(None)
        spans.append((-1, False, 0, 1))
    prev_break, prev_added = True, False  # the previous chunk: none / an image / a fold; ends with an added token
    n_img = 0
    for si, (seg, text, fold) in enumerate(zip(segments, texts, folded)):
        if fold:
            prev_break = True
        sup = seg.supervised
        first = len(flat)
        for k, chunk in enumerate(text.split(image_token) if image_token in text else (text,)):
            if k > 0:
                if len(flat) > first:
                    spans.append((si, sup, first, len(flat)))
                c = counts[n_img]
                run = fast.image_runs.get((image_token_id, c))
                if run is None:
                    run = fast.image_runs[(image_token_id, c)] = (image_token_id,) * c
                flat.append(run)
                keys.append(None)
                spans.append((si, None, len(flat) - 1, len(flat)))
                first = len(flat)
                n_img += 1
                prev_break, prev_added = True, False
            if not chunk:
                continue
            prefix = plain or prev_break or (prev_added and prefix_after_added)
            prev_break, prev_added = False, bool(added) and chunk.endswith(added)
            if words is None and prefix:
                key = (_MAIN, chunk)
                flat.append(frequent_chunk(key))
                keys.append(key)
                continue
            # as _encode_chunk: up to the first added token (prefixed or not), the tokenizer's rules after it;
            # none can start before the first occurrence of their common first character (str.find is a memchr)
            if added_first is not None:
                at = chunk.find(added_first)
                m = added_re.search(chunk, at) if at >= 0 else None
            else:
                m = added_re.search(chunk) if added_re is not None else None
            cut = m.start() if m is not None else len(chunk)
            if cut:
                head_text = chunk[:cut] if m is not None else chunk
                if words is None:
                    key = (_CONT, head_text)
                    flat.append(frequent_chunk(key))
                    keys.append(key)
                else:
                    if rep in head_text or "  " in head_text:
                        head, ws = _word_keys(words, head_text, prefix)
                    else:  # single spaces only (as in _word_keys)
                        ws = head_text.split(" ")
                        head = None
                        if head_text[0] == " ":
                            del ws[0]
                        elif not prefix:
                            head = (_CONT, ws.pop(0))
                    if head is not None:
                        flat.append(frequent_chunk(head))
                        keys.append(head)
                    flat += map(frequent_word, ws)  # most words are in the cache's old generation
                    keys += ws
            if m is not None:
                key = (_MAIN, chunk[cut:])
                flat.append(frequent_chunk(key))
                keys.append(key)
        if len(flat) > first:
            spans.append((si, sup, first, len(flat)))

    if None in flat:  # what the old generations did not have: memo, young generations, then the tokenizer
        memo = {} if memo is None else memo
        remembered = memo.get
        missing: list = []  # keys to encode, each once
        late: list[int] = []
        find = flat.index
        i = find(None)
        while True:
            key = keys[i]
            hit = remembered(key, memo)
            if hit is memo:  # not looked up yet in this conversation
                hit = memo[key] = word_cache.get(key) if type(key) is str else chunk_cache.get(key)
                if hit is None:
                    missing.append(key)
            if hit is None:
                late.append(i)
            else:
                flat[i] = hit
            try:
                i = find(None, i + 1)
            except ValueError:
                break
        if missing:
            for key, piece in zip(missing, _encode_keys(tok, info, fast, missing)):
                # a tuple of ints is not tracked by the garbage collector, a list is: tens of thousands of cached
                # lists would make every full collection walk them all
                memo[key] = piece = tuple(piece)
                if type(key) is str:
                    if len(key) <= _WORD_CACHE_TEXT:
                        word_cache.put(key, piece)
                elif len(key[1]) <= _CHUNK_CACHE_TEXT:
                    chunk_cache.put(key, piece)
        for i in late:
            flat[i] = memo[keys[i]]

    ids = list(chain.from_iterable(flat))
    labels = [IGNORE_INDEX] * len(ids)
    pos = [0, *accumulate(map(len, flat))]  # pos[i]: where part i starts in ids
    runs: list[tuple[int, int]] = []
    for si, sup, a, b in spans:
        start, end = pos[a], pos[b]
        if start == end:
            continue
        if sup:
            labels[start:end] = ids[start:end]
        runs.append((si, end - start))
    return _Tokenized(ids, labels, None, n_img, runs)


def tokenize_conversation(
    tokenizer: Any,
    template: "str | Template",
    conversations: Sequence[Mapping[str, Any]],
    image_token: str = DEFAULT_IMAGE_TOKEN,
    image_token_id: int | None = None,
    image_token_counts: Sequence[int] | None = None,
    max_length: int | None = None,
    *,
    reference: bool = False,
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
    ``reference=True`` takes the per-chunk path (one tokenizer call per chunk; for tests and benchmarks):
    the result is identical.
    """
    tpl = get_template(template)
    segments = [s for s in tpl.segments(conversations, tokenizer=tokenizer, image_token=image_token) if s.text]
    run = _tokenize_reference if reference else _tokenize
    memo: dict = {}  # chunk -> ids, shared by the re-tokenizations below
    out = run(tokenizer, segments, image_token, image_token_id, image_token_counts, memo)
    if max_length is not None and len(out.input_ids) > max_length:
        ex_len: dict[int, int] = {}
        for si, n in out.segment_runs():
            e = _exchange(segments[si]) if si >= 0 else 0
            ex_len[e] = ex_len.get(e, 0) + n
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
            out = run(tokenizer, kept, image_token, image_token_id, counts, memo)
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
    *,
    reference: bool = False,
) -> list[int]:
    """Prompt ids for generation: the chat (ending with a user turn) plus the open assistant slot.

    The ids are exactly the prefix that :func:`tokenize_conversation` produces for the same chat
    followed by an answer, i.e. what the model saw in training right before the answer.
    ``reference=True``: the per-chunk path, as in :func:`tokenize_conversation`.
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
    run = _tokenize_reference if reference else _tokenize
    out = run(tokenizer, segments, image_token, image_token_id, image_token_counts)
    cut = 0
    for si, n in out.segment_runs():
        if si == answer_at:
            break
        cut += n
    return out.input_ids[:cut]
