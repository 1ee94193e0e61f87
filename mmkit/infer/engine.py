"""Continuous batching for one VisionLanguageModel: one scheduler thread owns the model.

    engine = Engine(model, max_batch_size=16, max_batch_tokens=512)
    req = engine.submit(input_ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=64, stop=["###"])
    for delta in req:                     # text deltas as they are decided (or req.wait() for the whole text)
        print(delta, end="")
    req.finish_reason, req.token_ids, req.text
    engine.close()

Each scheduler step (1) takes new requests into free slots, encoding their images (through an LRU
cache of image features keyed by a hash of the pixel tensor) and embedding the prompt with the
model's own ``embed`` (image features spliced in at the image tokens); a prompt whose embeddings
begin like those of a sequence still in (or just freed from) a slot copies that prefix's keys/values
from its slot instead of recomputing them (``prefix_cache``; the last prompt token is always run, for
its logits; a prompt whose shared prefix another admitted request is still prefilling waits for it);
(2) prefills up to
``max_batch_tokens`` prompt tokens of the admitted requests in one forward pass, a long prompt in
chunks over several steps; (3) runs one decode step for every request whose prompt is done (with
``forward_threads > 1`` the prefill pass runs beside the decode pass, or the decode batch is split,
in worker threads). A
request leaves the batch the step it finishes (stop token, stop string, ``max_new_tokens``) or is
cancelled, and its slot is reused at once.

The KV cache (:class:`SlotCache`, a transformers ``Cache``) holds each sequence in its own slot of a
[slots, kv_heads, capacity, head_dim] tensor per layer, written at the sequence's own positions; a
forward pass sees the slots of its rows up to the longest of them, and a 4D mask limits each row to
its own past. Rows are never left-padded: a decode step is one token per sequence at its own
position id. Each request keeps its own sampler (temperature, top-p/k, seed), stop strings,
``max_new_tokens`` and incremental detokenizer (:mod:`mmkit.infer.detokenize`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import Cache

from mmkit.compat import llm_cache_kwargs
from mmkit.infer.detokenize import IncrementalDetokenizer
from mmkit.infer.generate import _Sampler, default_stop_token_ids

__all__ = ["Engine", "EngineClosed", "EngineRequest", "ImageFeatureCache", "SlotCache"]

log = logging.getLogger("mmkit.infer.engine")

_ids = itertools.count(1)


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished."""


# --------------------------------------------------------------------------- the KV cache


class SlotCache(Cache):
    """Per-sequence KV slots: layer l keeps keys/values [num_slots, kv_heads, capacity, head_dim].

    Before each forward pass the engine calls :meth:`plan` with the slots of the batch rows and the
    position of each row's first new token; ``update`` (called by every attention layer) writes the
    new keys/values at those positions and returns the rows' slots up to the furthest position.
    """

    def __init__(self, num_slots: int):
        super().__init__(layers=[])
        self.num_slots = num_slots
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # the plan of the forward pass running in this thread: two passes may run at once on disjoint slots
        self._local = threading.local()
        self._alloc = threading.Lock()

    def plan(self, rows: Sequence[int], starts: Sequence[int], width: int, device) -> None:
        p = self._local
        p.rows = torch.tensor(list(rows), dtype=torch.long, device=device)
        p.pos = torch.tensor(list(starts), dtype=torch.long, device=device)[:, None] + \
            torch.arange(width, device=device)[None, :]
        p.kv_len = max(starts) + width
        first = rows[0]
        p.span = (first, len(rows)) if list(rows) == list(range(first, first + len(rows))) else None
        self.reserve(p.kv_len)

    def reserve(self, need: int) -> None:
        """Grow every layer to hold ``need`` positions (only while no forward pass is running)."""
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 64)
        with self._alloc:
            for store in (self.keys, self.values):
                for i, old in enumerate(store):
                    new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
                    new[:, :, : old.shape[2]] = old
                    store[i] = new
            self.capacity = cap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.keys) <= layer_idx:
            with self._alloc:  # allocated on first use: the layer tells its head count and size
                while len(self.keys) <= layer_idx:
                    _, h, _, d = key_states.shape
                    self.keys.append(key_states.new_zeros(self.num_slots, h, self.capacity, d))
                    self.values.append(value_states.new_zeros(self.num_slots, h, self.capacity,
                                                              value_states.shape[-1]))
        p = self._local
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows, pos = p.rows[:, None], p.pos
        k[rows, :, pos] = key_states.transpose(1, 2).to(k.dtype)
        v[rows, :, pos] = value_states.transpose(1, 2).to(v.dtype)
        n = p.kv_len
        if p.span is not None:
            a, c = p.span
            return k[a:a + c, :, :n], v[a:a + c, :, :n]
        return k[:, :, :n].index_select(0, p.rows), v[:, :, :n].index_select(0, p.rows)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot ``dst`` takes the keys/values of slot ``src`` at positions [0, n) (between forward passes)."""
        if src == dst or n <= 0:
            return
        with torch.inference_mode():  # the slots are inference tensors
            for store in (self.keys, self.values):
                for t in store:
                    t[dst, :, :n] = t[src, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return getattr(self._local, "kv_len", 0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(), 0

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


# --------------------------------------------------------------------------- image features


class ImageFeatureCache:
    """LRU of image features keyed by a hash of the image's pixel tensor, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    @staticmethod
    def key(pixels: torch.Tensor, size=None) -> str:
        t = pixels.detach().contiguous().cpu()
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{tuple(t.shape)}|{t.dtype}|{tuple(size) if size is not None else None}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            feats = self._items.get(key)
            if feats is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        with self.lock:
            if size > self.max_bytes or key in self._items:
                return
            self._items[key] = feats
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading rows of two [L, D] embedding tensors are bitwise equal."""
    n = min(a.shape[0], b.shape[0])
    if n == 0 or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
        return 0
    same = (a[:n] == b[:n]).all(-1)
    return n if bool(same.all()) else int(same.to(torch.int8).argmin())


def _per_image(pixel_values, image_sizes) -> list[tuple[torch.Tensor, object]]:
    """pixel_values as the processor gives them -> [(views [V, 3, S, S], size or None)] per image."""
    if isinstance(pixel_values, torch.Tensor):
        views = list(pixel_values) if pixel_values.dim() == 5 else [v.unsqueeze(0) for v in pixel_values]
    else:
        views = list(pixel_values)
    sizes = list(image_sizes) if image_sizes is not None else [None] * len(views)
    if len(sizes) != len(views):
        raise ValueError(f"{len(views)} images but {len(sizes)} image_sizes")
    return list(zip(views, sizes))


# --------------------------------------------------------------------------- requests


class EngineRequest:
    """One request in the engine: iterate for text deltas, or ``wait()``; then the fields below are final."""

    def __init__(self, input_ids: torch.Tensor, pixel_values, image_sizes, image_features, sampler: _Sampler,
                 max_new_tokens: int, stop_ids: set[int], detok: IncrementalDetokenizer | None,
                 on_event: Callable[[str, object], None] | None, num_image_tokens: int):
        self.id = next(_ids)
        self.input_ids = input_ids
        self.pixel_values, self.image_sizes, self.image_features = pixel_values, image_sizes, image_features
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.detok = detok
        self.prompt_tokens = int(input_ids.shape[-1])
        self.image_tokens = num_image_tokens
        self.cached_tokens = 0  # prompt tokens whose keys/values were copied from another sequence's slot
        self.image_cache_hits = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length"; None when cancelled or failed
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None
        self._on_event = on_event
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._parts: list[str] = []
        # scheduler state
        self.slot: int | None = None
        self.embeds: torch.Tensor | None = None
        self.prompt_embeds: torch.Tensor | None = None  # kept while the slot lives: the key of its prefix
        self.prefix_checked = False
        self.own_ghost: tuple[torch.Tensor, int] | None = None
        self.prefilled = 0
        self.next_input: int | None = None

    # ------------------------------------------------------------ consumer side

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away): the slot is freed at the next step."""
        self.cancelled = True
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine._wake()

    close = cancel  # the interface of mmkit.infer.generate.GenerationStream

    def __iter__(self):
        if self._on_event is not None:
            raise RuntimeError("this request reports through on_event; it cannot also be iterated")
        while True:
            kind, value = self._events.get()
            if kind == "delta":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def wait(self, timeout: float | None = None) -> EngineRequest:
        """Block until the request is finished; raises its error if it failed."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    # ------------------------------------------------------------ scheduler side

    def _emit(self, kind: str, value) -> None:
        if kind == "delta":
            if not value:
                return
            self._parts.append(value)
        if self._on_event is not None:
            try:
                self._on_event(kind, value)
            except Exception:  # the consumer is gone (e.g. its event loop closed): nobody to tell
                log.debug("request %s: on_event failed", self.id, exc_info=True)
                self.cancelled = True
        else:
            self._events.put((kind, value))


# --------------------------------------------------------------------------- the engine


class Engine:
    """Owns the model in one scheduler thread; ``submit`` from any thread."""

    def __init__(self, model, max_batch_size: int = 16, max_batch_tokens: int = 512,
                 image_cache_bytes: int = 256 * 1024 * 1024, context_length: int | None = None,
                 forward_threads: int = 1, prefix_cache: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        if forward_threads < 1:
            raise ValueError(f"forward_threads must be >= 1, got {forward_threads}")
        # > 1: a prefill chunk runs beside the decode step, or the decode batch is split, in worker threads
        # (for small CPUs where one multi-threaded matrix product of a few rows is slower than two single ones)
        self.forward_threads = int(forward_threads)
        self._pool = ThreadPoolExecutor(self.forward_threads, thread_name_prefix="mmkit-forward") \
            if self.forward_threads > 1 else None
        text_cfg = model.llm.config.get_text_config()
        self.context_length = int(context_length or getattr(text_cfg, "max_position_embeddings", 0) or 4096)
        window = getattr(text_cfg, "sliding_window", None)
        if window and getattr(text_cfg, "use_sliding_window", True) and window < self.context_length:
            # the engine's mask is full causal attention: within the window that is what the model computes
            log.warning("the LLM uses a %d-token sliding window: sequences are limited to it", window)
            self.context_length = int(window)
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        # a new prompt whose embeddings start like a live (or just finished) sequence's copies that prefix's
        # keys/values from its slot instead of recomputing them: the keys/values of position i depend only
        # on the embeddings at positions <= i (causal attention, position ids from 0)
        self.prefix_cache = bool(prefix_cache)
        self._ghosts: dict[int, tuple[torch.Tensor, int]] = {}  # free slot -> (prompt embeds, valid positions)
        self.prefix_hit_tokens_total = 0
        self.tokenizer = getattr(model, "tokenizer", None)
        # a fast tokenizer must not decode here while another thread encodes with new truncation/padding
        # settings (the Rust object is then "already borrowed"): prompt builders hold this lock too
        self.tokenizer_lock = threading.RLock()
        self._default_stop_ids = default_stop_token_ids(model)
        self._cache = SlotCache(self.max_batch_size)
        self._free = list(range(self.max_batch_size))
        self._inbox: list[EngineRequest] = []
        self._waiting: list[EngineRequest] = []
        self._prefilling: list[EngineRequest] = []
        self._running: list[EngineRequest] = []
        self._cv = threading.Condition()
        self._closed = False
        # counters for operators (read by mmkit.serve's /metrics)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.last_batch_size = 0
        head = model.llm.get_output_embeddings()
        self._plain_head = model._plain_head() if hasattr(model, "_plain_head") else False
        self._head = head
        self._thread = threading.Thread(target=self._loop, name="mmkit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public

    @property
    def queue_depth(self) -> int:
        """Requests submitted but not yet given a slot."""
        with self._cv:
            return len(self._inbox) + len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    def submit(self, input_ids, pixel_values=None, image_sizes=None, *, image_features=None,
               max_new_tokens: int = 64, temperature: float | None = None, do_sample: bool | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
               ignore_eos: bool = False, skip_special_tokens: bool = True, strip: bool = False,
               on_event: Callable[[str, object], None] | None = None, attention_mask=None,
               pad_token_id=None) -> EngineRequest:
        """Queue one prompt ([1, L] or [L] ids). Options as :func:`mmkit.infer.generate.generate`;
        ``strip`` strips the text (leading/trailing whitespace are never streamed);
        ``on_event(kind, value)`` is called from the scheduler thread with ("delta", str), ("done", req) or
        ("error", exc) instead of queuing them for iteration."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"Engine.submit takes one prompt, got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [L] or [1, L] tensor, got shape {tuple(ids.shape)}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("Engine.submit takes an unpadded prompt: attention_mask must be all ones")
        if max_new_tokens is None or int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if ids.numel() + int(max_new_tokens) > self.context_length:
            raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                             f"context length {self.context_length}")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model has none); use stop_token_ids")
        sampler = _Sampler(do_sample, temperature, top_k, top_p, seed, None)
        stop_ids = (set() if ignore_eos else set(self._default_stop_ids)) | {int(t) for t in (stop_token_ids or [])}
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, stops, skip_special_tokens=skip_special_tokens,
                                           strip=strip)
        n_img = int((ids == self.model.image_token_id).sum()) if self.model.image_token_id is not None else 0
        req = EngineRequest(ids.cpu(), pixel_values, image_sizes, image_features, sampler, int(max_new_tokens),
                            stop_ids, detok, on_event, n_img)
        req._engine = self
        with self._cv:
            self._inbox.append(req)
            self._cv.notify()
        return req

    def generate(self, input_ids, pixel_values=None, image_sizes=None, **kwargs) -> EngineRequest:
        """Submit and wait: the finished request."""
        return self.submit(input_ids, pixel_values, image_sizes, **kwargs).wait()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._inbox or self._prefilling or self._running or
                           (self._waiting and self._free)):
                    self._cv.wait()
                if self._closed:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._step()
            except Exception as exc:  # a bug in the scheduler itself: fail everything in flight, keep serving
                log.error("engine step failed", exc_info=exc)
                failed, self._prefilling, self._running = self._prefilling + self._running, [], []
                for req in failed:
                    self._fail(req, exc)
        err = EngineClosed("the engine was closed")
        with self._cv:
            pending = self._inbox + self._waiting
            self._inbox, self._waiting = [], []
        for req in pending + self._prefilling + self._running:
            self._fail(req, err)

    def _step(self) -> None:
        for group in (self._waiting, self._prefilling, self._running):
            for req in [r for r in group if r.cancelled]:
                group.remove(req)
                self._release(req, keep=True)
                req.t_done = time.perf_counter()
                req.done.set()
                req._emit("done", req)
        self._admit()
        jobs = []
        if self._prefilling:
            jobs.append(("prefill", self._prefill_batch()))
        if self._running:
            batch = sorted(self._running, key=lambda r: r.slot)
            # a batch is split only when each part keeps >= 8 rows: small passes in two threads mostly
            # wait for each other's Python (the GIL) instead of computing
            parts = max(1, min(len(batch) // 8, self.forward_threads - len(jobs)))
            size = -(-len(batch) // parts)
            jobs += [("decode", batch[i:i + size]) for i in range(0, len(batch), size)]
        if not jobs:
            return
        need = 0
        for kind, batch in jobs:
            if kind == "prefill":
                need = max(need, max(r.prefilled for r, _ in batch) + max(t for _, t in batch))
            else:
                need = max(need, max(r.prompt_tokens + len(r.token_ids) for r in batch))
        self._cache.reserve(need)  # before any pass runs: passes in parallel must not grow the cache
        if len(jobs) == 1 or self._pool is None or not self._cache.keys:
            outcomes = [self._run_job(job) for job in jobs]
        else:
            outcomes = list(self._pool.map(self._run_job, jobs))
        self.last_batch_size = sum(len(b) for k, b in jobs if k == "decode")
        with self.tokenizer_lock:
            for (kind, batch), out in zip(jobs, outcomes):
                if isinstance(out, Exception):
                    log.error("%s step failed", kind, exc_info=out)
                    for req in (r for r, _ in batch) if kind == "prefill" else batch:
                        (self._prefilling if kind == "prefill" else self._running).remove(req)
                        self._fail(req, out)
                elif kind == "prefill":
                    self._prefill_done(batch, out)
                else:
                    self.steps_total += 1
                    for i, req in enumerate(batch):
                        self._accept_or_fail(req, out[i:i + 1])

    def _run_job(self, job):
        """One forward pass (maybe in a worker thread): logits, or the exception it raised."""
        kind, batch = job
        try:
            if kind == "prefill":
                width = max(t for _, t in batch)
                dim = batch[0][0].embeds.shape[-1]
                embeds = batch[0][0].embeds.new_zeros(len(batch), width, dim)
                for i, (req, take) in enumerate(batch):
                    embeds[i, :take] = req.embeds[req.prefilled:req.prefilled + take]
                return self._forward([r.slot for r, _ in batch], [r.prefilled for r, _ in batch], embeds,
                                     [t for _, t in batch])
            ids = torch.tensor([[r.next_input] for r in batch], dtype=torch.long, device=self.model.device)
            with torch.inference_mode():
                embeds = self.model.llm.get_input_embeddings()(ids)
            return self._forward([r.slot for r in batch], [r.prompt_tokens + len(r.token_ids) - 1 for r in batch],
                                 embeds, [1] * len(batch))
        except Exception as exc:  # noqa: BLE001 - reported to the requests of this pass only
            return exc

    def _admit(self) -> None:
        while self._waiting and self._free:
            req = self._waiting.pop(0)
            if req.max_new_tokens == 0:
                req.finish_reason = "length"
                self._finish(req)
                continue
            try:
                with torch.inference_mode():
                    feats = self._image_features(req)
                    req.embeds = self.model.embed(req.input_ids[None].to(self.model.device), feats)[0]
            except Exception as exc:  # noqa: BLE001 - this request's inputs are bad (e.g. features vs placeholders)
                self._fail(req, exc)
                continue
            req.pixel_values = req.image_features = None
            req.prompt_embeds = req.embeds
            req.slot = self._pick_slot(req)
            self._free.remove(req.slot)
            # the slot's finished sequence: only this request may reuse it (it overwrites it from its prefill on)
            req.own_ghost = self._ghosts.pop(req.slot, None)
            self._prefilling.append(req)

    def _image_features(self, req: EngineRequest) -> torch.Tensor | None:
        if req.image_features is not None:
            return req.image_features.to(self.model.device)
        pv = req.pixel_values
        if pv is None or len(pv) == 0:
            return None
        parts = []
        for views, size in _per_image(pv, req.image_sizes):
            key = ImageFeatureCache.key(views, size)
            feats = self.image_cache.get(key)
            if feats is None:
                feats = self.model.encode_images([views], None if size is None else [size])
                self.image_cache.put(key, feats)
            else:
                req.image_cache_hits += 1
            parts.append(feats)
        return torch.cat(parts, dim=0)

    def _pick_slot(self, req: EngineRequest) -> int:
        """A free slot: an unused one, else the one whose finished sequence ended longest ago (other
        requests may still copy a finished sequence's prefix from its slot until the slot is taken)."""
        unused = [s for s in self._free if s not in self._ghosts]
        if unused:
            return min(unused)
        return next(s for s in self._ghosts if s in self._free)

    def _reuse_prefix(self, req: EngineRequest, ahead: list[EngineRequest]) -> bool:
        """Copy the longest prompt prefix available in another slot into ``req``'s; False: wait for a
        request ahead of it that is still prefilling a longer shared prefix (then copy that next step)."""
        emb, cap = req.prompt_embeds, req.prompt_tokens - 1  # the last prompt token is run: its logits
        best_src, best_n, future = req.slot, 0, 0
        ghost = req.own_ghost
        candidates = [(o.slot, o.prompt_embeds, min(o.prefilled, o.prompt_tokens), o in ahead)
                      for o in self._prefilling + self._running if o is not req and o.prompt_embeds is not None]
        candidates += [(slot, g[0], g[1], False) for slot, g in self._ghosts.items()]
        if ghost is not None:
            candidates.append((req.slot, ghost[0], ghost[1], False))
        for slot, other, valid, pending in candidates:
            shared = min(_common_prefix(emb, other), cap)
            if min(shared, valid) > best_n:
                best_src, best_n = slot, min(shared, valid)
            if pending:
                future = max(future, shared)
        if future > best_n:
            return False
        req.own_ghost = None
        if best_n > 0:
            self._cache.copy_prefix(best_src, req.slot, best_n)
            req.prefilled = req.cached_tokens = best_n
            self.prefix_hit_tokens_total += best_n
        return True

    def _prefill_batch(self) -> list[tuple[EngineRequest, int]]:
        """The admitted requests' next prompt chunks, up to max_batch_tokens in all."""
        budget = self.max_batch_tokens
        batch: list[tuple[EngineRequest, int]] = []
        for i, req in enumerate(self._prefilling):
            if budget <= 0:
                break
            if self.prefix_cache and not req.prefix_checked:
                if not self._reuse_prefix(req, self._prefilling[:i]):
                    continue
                req.prefix_checked = True
            take = min(req.embeds.shape[0] - req.prefilled, budget)
            batch.append((req, take))
            budget -= take
        return batch

    def _prefill_done(self, batch: list[tuple[EngineRequest, int]], logits: torch.Tensor) -> None:
        for i, (req, take) in enumerate(batch):
            req.prefilled += take
            if req.prefilled < req.embeds.shape[0]:
                continue  # more chunks to go
            self._prefilling.remove(req)
            self.prompt_tokens_total += req.prompt_tokens
            req.embeds = None
            self._running.append(req)  # decodes from the next step on
            self._accept_or_fail(req, logits[i:i + 1])

    def _forward(self, rows: list[int], starts: list[int], embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """One forward pass of the LLM over rows of new embeddings -> logits [B, V] at each row's last real token."""
        device = self.model.device
        b, t, _ = embeds.shape
        with torch.inference_mode():
            start = torch.tensor(starts, dtype=torch.long, device=device)
            pos = start[:, None] + torch.arange(t, device=device)[None, :]
            kv = max(starts) + t
            allowed = torch.arange(kv, device=device)[None, None, :] <= pos[:, :, None]  # [B, T, KV]
            mask = torch.zeros(b, 1, t, kv, dtype=embeds.dtype, device=device)
            mask.masked_fill_(~allowed[:, None], torch.finfo(embeds.dtype).min)
            self._cache.plan(rows, starts, t, device)
            last = torch.tensor(lengths, dtype=torch.long, device=device) - 1
            llm = self.model.llm
            if self._plain_head:
                out = llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                                        **llm_cache_kwargs(self._cache))
                hidden = out.last_hidden_state[torch.arange(b, device=device), last]
                return self._head(hidden).float()
            out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                      **llm_cache_kwargs(self._cache))
            return out.logits[torch.arange(b, device=device), last].float()

    def _accept_or_fail(self, req: EngineRequest, logits: torch.Tensor) -> None:
        """:meth:`_accept`; an error there (its sampler, its detokenizer) fails this request only."""
        try:
            self._accept(req, logits)
        except Exception as exc:  # reported to this request; the batch goes on
            log.error("request %s failed after its forward pass", req.id, exc_info=exc)
            if req in self._running:
                self._running.remove(req)
            if not req.done.is_set():
                self._fail(req, exc)

    def _accept(self, req: EngineRequest, logits: torch.Tensor) -> None:
        """Sample the request's next token from its logits [1, V] and do the stop bookkeeping."""
        tok = int(req.sampler(logits)[0])
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
        req.token_ids.append(tok)
        self.generation_tokens_total += 1
        req.next_input = tok
        if tok in req.stop_ids:
            req.finish_reason = "stop"
        elif req.detok is not None:
            req._emit("delta", req.detok.add(tok))
            if req.detok.stopped:
                req.finish_reason = "stop"
        if req.finish_reason is None and len(req.token_ids) >= req.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            self._running.remove(req)
            self._finish(req)

    def _finish(self, req: EngineRequest) -> None:
        if req.detok is not None:
            with self.tokenizer_lock:
                req._emit("delta", req.detok.finish())
        self._release(req, keep=True)
        req.t_done = time.perf_counter()
        req.done.set()
        req._emit("done", req)

    def _fail(self, req: EngineRequest, exc: BaseException) -> None:
        self._release(req)
        req.error = exc
        req.t_done = time.perf_counter()
        req.done.set()
        req._emit("error", exc)

    def _release(self, req: EngineRequest, keep: bool = False) -> None:
        """Free the request's slot; ``keep``: its prompt's keys/values stay reusable until the slot is taken."""
        if req.slot is not None:
            valid = min(req.prefilled, req.prompt_tokens)
            if keep and self.prefix_cache and req.prompt_embeds is not None and valid > 0:
                self._ghosts[req.slot] = (req.prompt_embeds, valid)
            self._free.append(req.slot)
            req.slot = None
        req.embeds = req.prompt_embeds = None
