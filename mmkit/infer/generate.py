"""Decoding for VisionLanguageModel: our own loop over ``model.llm`` with a KV cache.

    ids = generate(model, input_ids, attention_mask, pixel_values, image_sizes, max_new_tokens=64)
    texts = generate(model, ..., return_text=True)
    for delta in stream_generate(model, ...):          # batch of 1; str deltas
        print(delta, end="", flush=True)

The images are encoded once per request (``model.encode_images``); the prompt is prefilled as
``inputs_embeds`` (image features spliced in by ``model.embed``) and then decoded token by token
from the cache. Greedy by default; ``temperature > 0`` (or ``do_sample=True``) samples, with
``top_k`` / ``top_p`` and a seeded ``torch.Generator``.

Left-padded batches get the position ids transformers' ``generate`` gives them
(``cumsum(mask) - 1``, pads at 0, then +1 per new token), and the 2D mask is dropped when there is
no padding at all, so greedy outputs are token-identical to
``LlavaForConditionalGeneration.generate`` on the same weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from mmkit.compat import llm_cache_kwargs
from mmkit.infer.detokenize import IncrementalDetokenizer, held_back

__all__ = ["GenerationResult", "GenerationStream", "generate", "stream_generate", "default_stop_token_ids"]

_FINISH_STOP = "stop"
_FINISH_LENGTH = "length"


# --------------------------------------------------------------------------- options


@dataclass
class GenerationResult:
    """Everything one ``generate`` call produced (``return_dict=True``)."""

    sequences: torch.Tensor  # [B, N] new token ids, padded with pad_token_id after a row stops
    token_ids: list[list[int]]  # per row: new ids up to and including the stop token (as transformers)
    texts: list[str] | None  # per row: decoded reply, stop token/string removed (None without tokenizer)
    finish_reasons: list[str]  # "stop" | "length"
    num_prompt_tokens: list[int]  # per row, without padding, image tokens included
    num_image_tokens: list[int] = field(default_factory=list)

    @property
    def num_generated_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def default_stop_token_ids(model) -> list[int]:
    """The eos id(s): the LLM's generation config, else its config, else the tokenizer's."""
    gen_cfg = getattr(model.llm, "generation_config", None)
    ids = _as_id_list(getattr(gen_cfg, "eos_token_id", None))
    if not ids:
        ids = _as_id_list(getattr(model.llm.config.get_text_config(), "eos_token_id", None))
    tok = getattr(model, "tokenizer", None)
    if not ids and tok is not None and tok.eos_token_id is not None:
        ids = [tok.eos_token_id]
    return ids


def _pad_token_id(model, explicit: int | None, stop_ids: Sequence[int]) -> int:
    if explicit is not None:
        return int(explicit)
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    for source in (getattr(model.llm, "generation_config", None), model.llm.config.get_text_config()):
        pad = getattr(source, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return int(stop_ids[0]) if stop_ids else 0


class _Sampler:
    """Turns last-position logits [B, V] into next ids [B]: argmax, or temperature/top-k/top-p sampling."""

    def __init__(self, do_sample: bool | None, temperature: float | None, top_k: int | None, top_p: float | None,
                 seed: int | None, generator: torch.Generator | None):
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if do_sample is None:
            do_sample = temperature is not None and temperature > 0
        if do_sample and temperature == 0:
            do_sample = False  # temperature 0 means greedy, as in the OpenAI API
        self.do_sample = bool(do_sample)
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.top_k = int(top_k or 0)
        self.top_p = 1.0 if top_p is None else float(top_p)
        self.generator = generator
        self.seed = seed

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(self.seed))
        return self.generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k > 0:
            k = min(self.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the tokens ranked before it already reach top_p (the first one always stays)
            drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator_for(probs.device)).squeeze(-1)


# --------------------------------------------------------------------------- the decoding loop


def _supports_logits_to_keep(llm) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(llm.forward).parameters
    except (TypeError, ValueError):
        return False


def _token_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features, sampler: _Sampler
                 ) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] step after step (forever; the caller stops).

    The forward pass for step k+1 only runs when step k+1 is asked for, so stopping costs nothing.
    """
    llm = model.llm
    device = model.device
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device=device, dtype=torch.long)
    padded = not bool(mask.all())
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(llm) else {}
    cache = DynamicCache(config=llm.config)
    ones = mask.new_ones((mask.shape[0], 1))
    # inference_mode is entered per step, never held across a yield (it would leak into the caller)
    with torch.inference_mode():
        embeds = model.embed(input_ids, image_features)
        out = llm(inputs_embeds=embeds, attention_mask=mask if padded else None, position_ids=position_ids,
                  use_cache=True, **llm_cache_kwargs(cache), **extra)
        next_ids = sampler(out.logits[:, -1, :].float())
    last_pos = position_ids[:, -1:]
    while True:
        yield next_ids
        with torch.inference_mode():
            last_pos = last_pos + 1
            if padded:
                mask = torch.cat([mask, ones], dim=-1)
            out = llm(input_ids=next_ids[:, None], attention_mask=mask if padded else None, position_ids=last_pos,
                      use_cache=True, **llm_cache_kwargs(cache), **extra)
            next_ids = sampler(out.logits[:, -1, :].float())


def _prepare(model, input_ids, attention_mask, pixel_values, image_sizes, image_features):
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor([list(input_ids)] if input_ids and isinstance(input_ids[0], int) else input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generation needs left padding: the last position of every row must be a real token "
                         "(use the processor with padding_side='left')")
    if image_features is None and pixel_values is not None and len(pixel_values):
        with torch.inference_mode():
            image_features = model.encode_images(pixel_values, image_sizes)
    return input_ids, attention_mask, image_features


class _Run:
    """Shared state of one generation request: stopping per row, text, finish reasons."""

    def __init__(self, model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, *,
                 max_new_tokens: int = 64, do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 pad_token_id: int | None = None, image_features: torch.Tensor | None = None,
                 skip_special_tokens: bool = True, tokenizer=None):
        if max_new_tokens is None or int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.input_ids, self.attention_mask, self.image_features = _prepare(
            model, input_ids, attention_mask, pixel_values, image_sizes, image_features)
        self.batch = self.input_ids.shape[0]
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.stop_strings = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if self.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model has none); use stop_token_ids")
        ids = [] if ignore_eos else default_stop_token_ids(model)
        self.stop_ids = set(ids) | set(_as_id_list(stop_token_ids))
        self.pad_id = _pad_token_id(model, pad_token_id, ids or sorted(self.stop_ids))
        self.skip_special_tokens = skip_special_tokens
        self.sampler = _Sampler(do_sample, temperature, top_k, top_p, seed, generator)
        self.tokens: list[list[int]] = [[] for _ in range(self.batch)]
        self.done = [False] * self.batch
        self.finish: list[str | None] = [None] * self.batch
        self.stop_at: list[int | None] = [None] * self.batch  # char index of a stop string in the text
        self.steps = 0
        self._cache_key: dict[int, tuple] = {}
        self._cache_text: dict[int, str] = {}
        mask = self.attention_mask
        self.num_prompt_tokens = [int(n) for n in mask.sum(-1)]
        is_img = (self.input_ids == model.image_token_id) & mask.bool()
        self.num_image_tokens = [int(n) for n in is_img.sum(-1)]

    # ---------------------------------------------------------------- text

    def _decode(self, row: int, toks: list[int]) -> str:
        key = (row, len(toks), toks[-1] if toks else None)
        if self._cache_key.get(row) != key:  # one decode per row and step, shared by stop checks and streaming
            self._cache_key[row] = key
            self._cache_text[row] = self.tokenizer.decode(toks, skip_special_tokens=self.skip_special_tokens)
        return self._cache_text[row]

    def text_of(self, row: int) -> str:
        toks = self.tokens[row]
        if toks and toks[-1] in self.stop_ids and self.finish[row] == _FINISH_STOP and self.stop_at[row] is None:
            toks = toks[:-1]
        text = self._decode(row, toks)
        if self.stop_at[row] is not None:
            text = text[: self.stop_at[row]]
        return text

    def _find_stop_string(self, row: int) -> int | None:
        text = self._decode(row, self.tokens[row])
        hits = [text.find(s) for s in self.stop_strings]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    # ---------------------------------------------------------------- stepping

    def steps_iter(self) -> Iterator[torch.Tensor]:
        """Run the loop; yields the step's ids [B] after the stop bookkeeping for them is done."""
        if self.max_new_tokens == 0:
            for row in range(self.batch):
                self.finish[row] = _FINISH_LENGTH
            return
        steps = _token_steps(self.model, self.input_ids, self.attention_mask, self.image_features, self.sampler)
        try:
            for next_ids in steps:
                ids = next_ids.tolist()
                for row, tok in enumerate(ids):
                    if self.done[row]:
                        continue
                    self.tokens[row].append(tok)
                    if tok in self.stop_ids:
                        self.done[row], self.finish[row] = True, _FINISH_STOP
                    elif self.stop_strings:
                        pos = self._find_stop_string(row)
                        if pos is not None:
                            self.done[row], self.finish[row], self.stop_at[row] = True, _FINISH_STOP, pos
                self.steps += 1
                if self.steps >= self.max_new_tokens:
                    for row in range(self.batch):
                        if not self.done[row]:
                            self.done[row], self.finish[row] = True, _FINISH_LENGTH
                yield next_ids
                if all(self.done):
                    break
        finally:
            steps.close()

    def result(self) -> GenerationResult:
        width = max((len(t) for t in self.tokens), default=0)
        seq = torch.full((self.batch, width), self.pad_id, dtype=torch.long)
        for row, toks in enumerate(self.tokens):
            if toks:
                seq[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        texts = [self.text_of(r) for r in range(self.batch)] if self.tokenizer is not None else None
        return GenerationResult(sequences=seq, token_ids=[list(t) for t in self.tokens], texts=texts,
                                finish_reasons=[f or _FINISH_LENGTH for f in self.finish],
                                num_prompt_tokens=self.num_prompt_tokens, num_image_tokens=self.num_image_tokens)


# --------------------------------------------------------------------------- public API


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, *,
             return_text: bool = False, return_dict: bool = False, **kwargs):
    """Generate continuations of (left-padded) prompts.

    Options: ``max_new_tokens`` (64), ``temperature`` (None/0 = greedy), ``do_sample``, ``top_p``,
    ``top_k``, ``seed`` or ``generator``, ``stop`` (strings), ``stop_token_ids`` (added to eos),
    ``ignore_eos``, ``pad_token_id``, ``image_features`` (already encoded), ``skip_special_tokens``.

    Returns the new token ids as a [B, N] LongTensor (rows padded with the pad id after they stop;
    the stop token itself is kept, as transformers does), or the decoded replies (``return_text``),
    or a :class:`GenerationResult` (``return_dict``).
    """
    run = _Run(model, input_ids, attention_mask, pixel_values, image_sizes, **kwargs)
    if return_text and run.tokenizer is None:
        raise ValueError("return_text=True needs a tokenizer, and this model has none")
    for _ in run.steps_iter():
        pass
    res = run.result()
    if return_dict:
        return res
    if return_text:
        return res.texts
    return res.sequences


_held_back = held_back  # the old private name, kept for callers


class GenerationStream:
    """Iterator of text deltas for one prompt; after it ends: ``finish_reason``, token counts, ``text``.

    Deltas come from :class:`mmkit.infer.detokenize.IncrementalDetokenizer`: characters that span
    several tokens and word-boundary spaces come out right, text that could still become a stop
    string (or an incomplete UTF-8 character) is held back until it is decided, and the deltas
    concatenate to ``text``. ``close()`` stops
    generation early (e.g. when a client disconnects).
    """

    def __init__(self, model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, **kwargs):
        self._run = _Run(model, input_ids, attention_mask, pixel_values, image_sizes, **kwargs)
        if self._run.batch != 1:
            raise ValueError(f"stream_generate takes one prompt, got a batch of {self._run.batch}")
        if self._run.tokenizer is None:
            raise ValueError("stream_generate needs a tokenizer, and this model has none")
        self._steps = self._run.steps_iter()
        self._detok = IncrementalDetokenizer(self._run.tokenizer, self._run.stop_strings,
                                             skip_special_tokens=self._run.skip_special_tokens)
        self._fed = 0
        self._finished = False

    def __iter__(self) -> "GenerationStream":
        return self

    def _feed(self) -> str:
        run, out = self._run, []
        toks = run.tokens[0]
        while self._fed < len(toks) and not self._detok.stopped:
            tok = toks[self._fed]
            self._fed += 1
            if tok in run.stop_ids:
                break
            out.append(self._detok.add(tok))
        return "".join(out)

    def __next__(self) -> str:
        while not self._finished:
            try:
                next(self._steps)
            except StopIteration:
                self._finished = True
                break
            delta = self._feed()
            if self._run.done[0]:
                self._finished = True
                delta += self._detok.finish()
            if delta:
                return delta
        delta = self._feed() + self._detok.finish()
        if delta:
            return delta
        raise StopIteration

    def close(self) -> None:
        self._finished = True
        self._steps.close()

    @property
    def text(self) -> str:
        return self._detok.text

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish[0]

    @property
    def completion_tokens(self) -> int:
        return len(self._run.tokens[0])

    @property
    def token_ids(self) -> list[int]:
        return list(self._run.tokens[0])

    @property
    def prompt_tokens(self) -> int:
        return self._run.num_prompt_tokens[0]

    @property
    def image_tokens(self) -> int:
        return self._run.num_image_tokens[0]


def stream_generate(model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                    **kwargs) -> GenerationStream:
    """Like :func:`generate` for one prompt, but yields str deltas as tokens are produced."""
    return GenerationStream(model, input_ids, attention_mask, pixel_values, image_sizes, **kwargs)
