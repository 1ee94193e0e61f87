"""Token ids in, text deltas out, such that the deltas concatenate to exactly the final text.

    detok = IncrementalDetokenizer(tokenizer, stop=["###"], strip=True)
    for tok in ids:
        emit(detok.add(tok))          # "" while a character or a possible stop string is incomplete
        if detok.stopped: break
    emit(detok.finish())
    assert "".join(all_deltas) == detok.text

Each new id decodes the whole sequence once (the text at the last character boundary is kept, so
that is the only decode per id); only the new suffix past that boundary is taken, so a tokenizer's
context-dependent decoding (SentencePiece's leading space, words joined by spaces) comes out as the
whole decode has it. A suffix whose text ends in U+FFFD (an incomplete UTF-8 sequence so far) is not
taken until a later token completes it or the stream ends, so a byte-level tokenizer never emits a
replacement character that the whole decode would not contain (the window's text before such a
trailing U+FFFD run is decided already, and is used at once). Text that could still turn into a
stop string is held back until it is decided; with ``strip=True`` leading whitespace is dropped and
trailing whitespace is held back (and dropped at the end), so the text is ``str.strip()``-ed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["IncrementalDetokenizer", "held_back"]


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters may still turn into a stop string or a multi-token character."""
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n = len(text)
    while n - hold > 0 and text[n - hold - 1] == "\ufffd":  # an incomplete UTF-8 sequence so far
        hold += 1
    return hold


class IncrementalDetokenizer:
    """Turns one sequence's new token ids into text deltas; ``text`` is the concatenation of all deltas."""

    def __init__(self, tokenizer, stop: Sequence[str] | str | None = None, skip_special_tokens: bool = True,
                 strip: bool = False):
        self.tokenizer = tokenizer
        self.stop_strings = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop_strings), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.strip = strip
        self.ids: list[int] = []
        self._read_offset = 0  # ids[read_offset:]: the window, not at a character boundary yet
        self._prefix = ""  # decode(ids[:read_offset])
        self._pending = 0  # characters of the window's decided text already in _decoded
        self._decoded = ""  # the decoded text so far, cut at a stop string
        self._emitted = 0  # characters of _decoded handed out
        self._started = not strip  # a non-space character was seen (strip mode)
        self._parts: list[str] = []
        self.stopped = False  # a stop string was found; the text ends before it
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        # no clean-up of spaces before punctuation: it is not stable under windowing
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _append(self, new: str) -> None:
        start = max(0, len(self._decoded) - self._max_stop + 1)
        self._decoded += new
        if self.stop_strings:
            hits = [p for p in (self._decoded.find(s, start) for s in self.stop_strings) if p >= 0]
            if hits:
                self._decoded = self._decoded[:min(hits)]
                self.stopped = True

    def _take(self, final: bool) -> str:
        text = self._decoded
        if not self._started:
            lead = len(text) - len(text.lstrip())
            if lead == len(text):
                return ""
            self._emitted, self._started = lead, True
        end = len(text)
        if not final:
            if not self.stopped:
                end -= held_back(text, self.stop_strings)
            if self.strip:
                end = len(text[:end].rstrip())
        elif self.strip:
            end = len(text.rstrip())
        if end <= self._emitted:
            return ""
        delta = text[self._emitted:end]
        self._emitted = end
        self._parts.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated id; returns the text that is now certain ("" if none)."""
        if self.stopped or self.finished:
            return ""
        self.ids.append(int(token_id))
        prefix = self._prefix
        full = self._decode(self.ids)
        if len(full) <= len(prefix) or not full.startswith(prefix):
            return ""  # nothing new yet (or the tokenizer rewrote the context): wait for the next id
        new = full[len(prefix):]
        # what precedes a trailing run of U+FFFD is decided; the run itself may still become a character
        decided = new.rstrip("\ufffd")
        if len(decided) > self._pending:
            self._append(decided[self._pending:])
            self._pending = len(decided)
        if decided == new:  # at a character boundary: the next window starts here
            self._prefix, self._read_offset, self._pending = full, len(self.ids), 0
        return self._take(final=False)

    def finish(self) -> str:
        """The sequence ended: decode what is left (incomplete characters as U+FFFD) and flush."""
        if self.finished:
            return ""
        self.finished = True
        if not self.stopped and self._read_offset < len(self.ids):
            prefix = self._prefix
            full = self._decode(self.ids)
            if full.startswith(prefix):
                self._append(full[len(prefix) + self._pending:])
            else:  # a tokenizer whose decode is not prefix-stable: best effort, never repeats text
                self._append(self._decode(self.ids[self._read_offset:])[self._pending:])
            self._read_offset = len(self.ids)
        return self._take(final=True)

    @property
    def text(self) -> str:
        """Everything handed out so far (after ``finish``: the final text)."""
        return "".join(self._parts)
