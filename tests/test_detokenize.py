"""Incremental detokenizing: the streamed deltas concatenate to exactly the text decoded at the end."""

from __future__ import annotations

import random

import pytest

from mmkit.infer.detokenize import IncrementalDetokenizer
from tests.byte_tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def _expected(tok, ids, stops=(), strip=False):
    text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        text = text[:min(hits)]
    return text.strip() if strip else text


def _run(tok, ids, stops=(), strip=False):
    d = IncrementalDetokenizer(tok, list(stops), strip=strip)
    deltas = []
    used = 0
    for i in ids:
        deltas.append(d.add(i))
        used += 1
        if d.stopped:
            break
    deltas.append(d.finish())
    return deltas, d, used


def test_byte_level_tokens_really_split_characters(tok):
    ids = tok.encode("🙂 你好", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), pieces  # the test below exercises multi-byte boundaries


@pytest.mark.parametrize("strip", [False, True])
def test_random_ids_concatenate_to_the_full_decode(tok, strip):
    rng = random.Random(0)
    vocab = len(tok)
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        deltas, d, _ = _run(tok, ids, strip=strip)
        assert "".join(deltas) == d.text == _expected(tok, ids, strip=strip), (trial, ids)


def test_no_delta_ends_inside_a_character(tok):
    ids = tok.encode("naïve 🙂🚀 你好世界", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    deltas = [d.add(i) for i in ids] + [d.finish()]
    assert all("\ufffd" not in x for x in deltas), deltas
    assert "".join(deltas) == "naïve 🙂🚀 你好世界"


def test_stop_strings_spanning_tokens(tok):
    rng = random.Random(1)
    vocab = len(tok)
    spanning = 0
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(4, 40))]
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len(full) < 4:
            continue
        a = rng.randrange(0, len(full) - 2)
        stop = full[a:a + rng.randrange(2, 5)]
        if "\ufffd" in stop:
            continue
        deltas, d, used = _run(tok, ids, [stop, "never-there"], strip=trial % 2 == 0)
        assert d.stopped, (trial, ids, stop)
        assert "".join(deltas) == _expected(tok, ids, [stop], strip=trial % 2 == 0), (trial, ids, stop)
        assert stop not in "".join(deltas)
        one_token = any(stop in tok.decode([i]) for i in ids)
        spanning += not one_token
        # generation stops at the token that completes the stop string, not later
        assert stop in _expected(tok, ids[:used], strip=False) and stop not in _expected(tok, ids[:used - 1])
    assert spanning > 50


def test_held_back_stop_prefix_is_released_when_it_does_not_match(tok):
    ids = tok.encode("the quick ## brown", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, ["###"])
    out = []
    for i in ids:
        out.append(d.add(i))
    out.append(d.finish())
    assert "".join(out) == "the quick ## brown" and not d.stopped


def test_strip_holds_back_trailing_whitespace(tok):
    d = IncrementalDetokenizer(tok, strip=True)
    deltas = [d.add(i) for i in tok.encode("  hello  \n", add_special_tokens=False)]
    assert "".join(deltas) == "hello"
    assert d.finish() == "" and d.text == "hello"
    d = IncrementalDetokenizer(tok, strip=True)
    deltas = [d.add(i) for i in tok.encode(" \t ", add_special_tokens=False)] + [d.finish()]
    assert "".join(deltas) == ""
