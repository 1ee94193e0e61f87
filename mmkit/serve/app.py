"""An OpenAI-compatible HTTP server for one VisionLanguageModel (FastAPI).

    app = create_app(model, ServeConfig(model_name="tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/chat/completions`` (text, ``image_url`` and ``video_url`` parts; base64 ``data:`` URLs
always, ``http(s)`` URLs only with ``allow_remote_images``, ``file://`` never; SSE streaming ending in
``data: [DONE]``; ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the true HTTP status; the
traceback of an unexpected failure goes to the server log only. Images are checked before they are
decoded: the number per request, the bytes of each, and from the header (``Image.open`` without ``load``)
the pixel count, the aspect ratio and the size the model's resize/pad will produce (the image budget of
``mmkit.processing.budget``), so a decompression bomb or a 4,000,000 x 1 PNG is refused without being expanded.

Requests beyond ``concurrency`` (the batch size) running + ``queue_size`` waiting get 429. Generation
runs in the batching engine's scheduler thread (``mmkit.infer.engine``): concurrent requests share
each forward pass, and the event loop keeps answering (health checks, 429s, other streams)
meanwhile. ``GET /metrics`` is the Prometheus text format (``mmkit.serve.metrics``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmkit.infer.chat import build_chat_inputs, stop_options
from mmkit.infer.engine import Engine as BatchEngine
from mmkit.infer.engine import EngineRequest
from mmkit.processing.budget import ImageLimitError
from mmkit.processing.video import VideoError, decode_video

# the settings live in a light module (no fastapi) for the command line; still importable from here
from mmkit.serve.config import MIB, ServeConfig, parse_size  # noqa: F401
from mmkit.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics, StatusCounter

log = logging.getLogger("mmkit.serve")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, "invalid_request_error", param, code)


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# --------------------------------------------------------------------------- images


def _check_image_header(data: bytes, cfg: ServeConfig, param: str, image_processor=None):
    """Open (header only), check the format and the image budget (pixels, aspect ratio, the size after the
    model's resize/pad: ``mmkit.processing.budget``), then decode. Returns an RGB PIL image."""
    limits = cfg.image_limits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce our own limit below
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError:
            raise _bad(f"image is too large: more than {cfg.max_pixels} pixels (raise it with --max-pixels)", param,
                       "image_too_large") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise _bad(
                "You uploaded an unsupported image. Please make sure your image has one of the following formats: "
                "['png', 'jpeg', 'gif', 'webp'].", param, "invalid_image_format") from None
        if im.format not in IMAGE_FORMATS:
            raise _bad(f"unsupported image format {im.format}; supported: png, jpeg, gif, webp", param,
                       "invalid_image_format")
        try:
            limits.check_size(im.width, im.height, image_processor)
        except ImageLimitError as exc:
            raise _bad(str(exc), param, "image_too_large") from None
        try:
            im.load()
            rgb = im.convert("RGB")
        except Image.DecompressionBombError:
            raise _bad(f"image is too large: more than {cfg.max_pixels} pixels (raise it with --max-pixels)", param,
                       "image_too_large") from None
        except Exception:
            raise _bad("the image could not be decoded (corrupt or truncated file)", param, "invalid_image") from None
    return rgb


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def _byte_limit(cfg: ServeConfig, what: str) -> tuple[int, str]:
    """The encoded-bytes limit of an image or a video, and the flag that raises it."""
    return (cfg.max_video_bytes, "--max-video-bytes") if what == "video" else (cfg.max_image_bytes,
                                                                              "--max-image-bytes")


def _decode_data_url(url: str, cfg: ServeConfig, param: str, what: str = "image") -> bytes:
    limit, flag = _byte_limit(cfg, what)
    example = "video/mp4" if what == "video" else "image/png"
    m = _DATA_URL.fullmatch(url)
    if not m:
        raise _bad(f"malformed data URL; expected data:{what}/<format>;base64,<data>", param, f"invalid_{what}_url")
    if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
        raise _bad(f"only base64 data URLs are supported (data:{example};base64,...)", param, f"invalid_{what}_url")
    payload = re.sub(r"\s+", "", m.group("data"))
    if len(payload) * 3 // 4 > limit + 3:
        raise _bad(f"{what} is too large: more than {limit} bytes (raise it with {flag})", param, f"{what}_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"the {what} data URL is not valid base64", param, "invalid_base64") from None
    if len(data) > limit:
        raise _bad(f"{what} is too large: {len(data)} bytes, the limit is {limit} bytes (raise it with {flag})",
                   param, f"{what}_too_large")
    if not data:
        raise _bad(f"the {what} data URL is empty", param, f"invalid_{what}")
    return data


def _decode_video(data: bytes, cfg: ServeConfig, param: str, image_processor=None):
    """Sampled frames of an uploaded video (``--video-frames`` / ``--video-fps``), each frame held to the
    image limits: a bad or oversized video is a 400 naming the part."""
    try:
        return decode_video(data, cfg.video_options(), cfg.image_limits(), image_processor, name="the video")
    except VideoError as exc:
        too_large = exc.reason in ("too_large", "too_many_bytes", "too_many_frames")
        code = "video_too_large" if too_large else "invalid_video"
        raise _bad(str(exc), param, code) from None


async def _fetch_remote(url: str, cfg: ServeConfig, param: str, what: str = "image") -> bytes:
    import httpx  # remote images are opt-in (--allow-remote-images): the HTTP client loads only then

    limit, flag = _byte_limit(cfg, what)

    def fail(msg: str) -> APIError:
        return APIError(422, f"could not fetch the {what} at {url}: {msg}", "invalid_request_error", param,
                        f"{what}_fetch_failed")

    try:
        async with httpx.AsyncClient(timeout=cfg.remote_timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(4):  # up to 3 redirects, each hop checked
                async with client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        nxt = str(resp.next_request.url) if resp.next_request is not None else ""
                        if not nxt.lower().startswith(("http://", "https://")):
                            raise fail("redirect to a non-http(s) URL")
                        url = nxt
                        continue
                    if resp.status_code >= 400:
                        raise fail(f"HTTP {resp.status_code}")
                    size = resp.headers.get("content-length")
                    if size and size.isdigit() and int(size) > limit:
                        raise _bad(f"{what} is too large: {size} bytes, the limit is {limit} bytes "
                                   f"(raise it with {flag})", param, f"{what}_too_large")
                    chunks, total = [], 0
                    async for chunk in resp.aiter_bytes():
                        total += len(chunk)
                        if total > limit:
                            raise _bad(f"{what} is too large: more than {limit} bytes (raise it with {flag})",
                                       param, f"{what}_too_large")
                        chunks.append(chunk)
                    return b"".join(chunks)
            raise fail("too many redirects")
    except APIError:
        raise
    except httpx.TimeoutException:
        raise fail(f"timed out after {cfg.remote_timeout} s") from None
    except httpx.HTTPError as exc:
        raise fail(type(exc).__name__) from None


# --------------------------------------------------------------------------- request parsing


@dataclass
class ParsedRequest:
    messages: list[dict]
    image_refs: list[tuple[str, str]]  # (url, param path), in placeholder order
    gen: dict
    stream: bool
    include_usage: bool
    max_tokens: int
    images: list = field(default_factory=list)
    max_tokens_given: bool = True  # False: the default, cut to the room the prompt leaves (OpenAI semantics)
    video_refs: list[tuple[str, str]] = field(default_factory=list)  # video_url parts, in placeholder order


MAX_JSON_DEPTH = 64  # a chat request nests about 6 levels; deeper input is refused before it is walked


def _short(value) -> str:
    """A client's value for an error message: JSON, cut short (never recursive on hostile nesting)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_depth(body: Any) -> None:
    """Iterative walk: refuse containers nested deeper than MAX_JSON_DEPTH (json.dumps, logging and the
    parsing below are recursive; a deep body must not reach them)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _bad(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", None, "invalid_json")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except RecursionError:  # the C scanner's own recursion guard: far deeper than any real request
        raise _bad(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", None, "invalid_json") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over Python's 4300-digit limit
        raise _bad(f"We could not parse the JSON body of your request ({exc}).", None, "invalid_json") from None
    _check_depth(body)
    return body


def _text(value: str, param: str) -> str:
    """A client's string must be encodable: a lone surrogate (JSON "\\ud800") is valid JSON but not text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{param} is not valid Unicode text: a lone surrogate {value[exc.start]!r} at character "
                   f"{exc.start}", param, "invalid_value") from None
    return value


def _media_url(part: dict, kind: str, what: str, role: str, ppath: str):
    """``(spec, url)`` of an ``image_url`` / ``video_url`` content part (``what``: "images" / "videos"), checked:
    user messages only, a non-empty string URL that is valid text."""
    if role != "user":
        raise _bad(f"{ppath}: {what} are only allowed in user messages", ppath, "invalid_value")
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _bad(f"{ppath}.{kind}.url must be a string", f"{ppath}.{kind}", "invalid_type")
    _text(url, f"{ppath}.{kind}.url")
    return spec, url


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {_short(value)}", key,
                   "invalid_type")
    if not integer and not math.isfinite(value):  # JSON NaN / Infinity: Python's json reads them as floats
        raise _bad(f"'{key}' must be a finite number, got {value}", key, "invalid_value")
    if value < lo or value > hi or (lo_open and value == lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _bad(f"'{key}' must be in {rng}, got {value}", key, "invalid_value")
    return value


def parse_chat_request(body: Any, cfg: ServeConfig, model_names: set[str], image_token: str,
                       max_tokens_limit: int, video_token: str = "<video>") -> ParsedRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    _text(model, "model")
    if model not in model_names:
        raise APIError(404, f"The model `{model}` does not exist. Available: {', '.join(sorted(model_names))}",
                       "invalid_request_error", "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_value")
    n = body.get("n", 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n", "unsupported_value")
    if body.get("tools") or body.get("functions"):
        raise _bad("tool/function calling is not supported by this server", "tools", "unsupported_parameter")
    if body.get("logprobs"):
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")

    out_msgs: list[dict] = []
    refs: list[tuple[str, str]] = []
    video_refs: list[tuple[str, str]] = []
    for i, msg in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        role = msg.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role must be one of system, developer, user, assistant; got {_short(role)}",
                       f"{where}.role", "invalid_value")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise _bad(f"{where}.content must be a string or a list of content parts", f"{where}.content",
                       "invalid_type")
        pieces: list[str] = []
        for j, part in enumerate(parts):
            ppath = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{ppath} must be an object", ppath, "invalid_type")
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{ppath}.text must be a string", f"{ppath}.text", "invalid_type")
                _text(text, f"{ppath}.text" if isinstance(content, list) else f"{where}.content")
                if image_token in text:
                    raise _bad(f"{ppath}.text contains the reserved image placeholder {image_token!r}; send images "
                               "as image_url parts", f"{ppath}.text", "invalid_value")
                if video_token and video_token in text:
                    raise _bad(f"{ppath}.text contains the reserved video placeholder {video_token!r}; send videos "
                               "as video_url parts", f"{ppath}.text", "invalid_value")
                pieces.append(text)
            elif kind == "image_url":
                spec, url = _media_url(part, kind, "images", role, ppath)
                detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
                if detail not in ("auto", "low", "high"):
                    raise _bad(f"{ppath}.image_url.detail must be auto, low or high", f"{ppath}.image_url.detail",
                               "invalid_value")
                refs.append((url, f"{ppath}.image_url"))
                pieces.append(image_token)
            elif kind == "video_url":  # as vLLM: {"type": "video_url", "video_url": {"url": ...}}
                _, url = _media_url(part, kind, "videos", role, ppath)
                video_refs.append((url, f"{ppath}.video_url"))
                pieces.append(video_token)
            else:
                raise _bad(f"{ppath}.type {_short(kind)} is not supported (text, image_url, video_url)",
                           f"{ppath}.type", "invalid_value")
        text = ""
        for piece in pieces:  # images and text parts joined with newlines
            text = piece if not text else (text + "\n" + piece)
        out_msgs.append({"role": role, "content": text})
    if len(refs) > cfg.max_images:
        raise _bad(f"too many images: {len(refs)}; at most {cfg.max_images} image(s) may be provided in one request",
                   "messages", "too_many_images")
    if len(video_refs) > cfg.max_videos:
        raise _bad(f"too many videos: {len(video_refs)}; at most {cfg.max_videos} video(s) may be provided in one "
                   "request", "messages", "too_many_videos")
    for what, url, param in [("image", u, p) for u, p in refs] + [("video", u, p) for u, p in video_refs]:
        low = url[:16].lower()  # cheap URL checks before anything is decoded or fetched
        if low.startswith("data:"):
            continue
        if low.startswith(("http://", "https://")):
            if not cfg.allow_remote_images:
                raise _bad(f"remote {what} URLs are disabled on this server; send the {what} as a base64 data URL "
                           "(or start the server with --allow-remote-images)", param, f"remote_{what}s_disabled")
            continue
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise _bad(f"unsupported {what} URL scheme {scheme!r}: use a base64 data URL"
                   + (" or http(s)" if cfg.allow_remote_images else ""), param, f"invalid_{what}_url")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    given = max_tokens is not None
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, max_tokens_limit)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _bad(f"'{key}' must be an integer, got {_short(max_tokens)}", key, "invalid_type")
    elif not 1 <= max_tokens <= max_tokens_limit:
        raise _bad(f"'{key}' must be in [1, {max_tokens_limit}], got {max_tokens}", key, "invalid_value")

    temperature = _number(body, "temperature", 0, 2, cfg.default_temperature)
    top_p = _number(body, "top_p", 0, 1, None, lo_open=True)
    top_k = _number(body, "top_k", 0, 1 << 30, None, integer=True)  # extension (vLLM)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True)
    for key in ("presence_penalty", "frequency_penalty"):  # accepted in OpenAI's range, not applied
        _number(body, key, -2, 2, None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
        raise _bad("'stop' must be a string or a list of at most 4 strings", "stop", "invalid_value")
    for i, one in enumerate(stop):
        _text(one, f"stop[{i}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = opts.get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise _bad(f"'stream_options.include_usage' must be a boolean, got {_short(include_usage)}",
                   "stream_options.include_usage", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)  # extension (vLLM)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos", "invalid_type")
    gen = {"max_new_tokens": max_tokens, "temperature": float(temperature), "top_p": top_p, "top_k": top_k,
           "seed": seed, "stop": [s for s in stop if s], "ignore_eos": ignore_eos}
    return ParsedRequest(out_msgs, refs, gen, stream, include_usage, max_tokens, max_tokens_given=given,
                         video_refs=video_refs)


# --------------------------------------------------------------------------- the engine


class Admission:
    """Counts requests in the server (running + waiting); refuses beyond the bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.lock = threading.Lock()

    def try_enter(self) -> "Ticket | None":
        with self.lock:
            if self.count >= self.limit:
                return None
            self.count += 1
            return Ticket(self)


class Ticket:
    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False

    def release(self) -> None:
        with self._admission.lock:
            if not self._released:
                self._released = True
                self._admission.count -= 1


class Engine:
    """The model plus what serving it needs: the batching engine, a prompt lock, the limits, the metrics."""

    def __init__(self, model, cfg: ServeConfig):
        self.model = model
        self.cfg = cfg
        text_cfg = model.llm.config.get_text_config()
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 0) or 4096)
        self.batcher = BatchEngine(model, max_batch_size=max(1, cfg.concurrency),
                                   max_batch_tokens=max(1, cfg.max_batch_tokens),
                                   image_cache_bytes=cfg.image_cache_bytes, context_length=self.context_length,
                                   forward_threads=max(1, cfg.forward_threads), prefix_cache=cfg.prefix_cache)
        self.context_length = self.batcher.context_length  # a sliding-window LLM is limited to its window
        self.prompt_lock = self.batcher.tokenizer_lock  # the tokenizer is shared: one user at a time
        self.admission = Admission(max(1, cfg.concurrency) + max(0, cfg.queue_size))
        self.max_tokens_limit = min(cfg.max_tokens_limit or self.context_length, self.context_length)
        self.stops = stop_options(model, cfg.template)
        self.image_token = getattr(model.recipe.model, "image_token", "<image>") or "<image>"
        self.video_token = getattr(model.recipe.model, "video_token", "<video>") or "<video>"
        self.takes_video = getattr(model, "video_token_id", None) is not None
        # the image budget sizes the model's resize/pad from the header (None: pixels and aspect ratio only)
        self.image_processor = getattr(getattr(model, "processor", None), "image_processor", None)
        self.created = int(time.time())
        self.metrics = ServeMetrics(self.batcher)

    @property
    def running(self) -> int:
        return self.batcher.num_running

    def model_names(self) -> set[str]:
        return {self.cfg.model_name, *self.cfg.extra_model_names}

    def build_inputs(self, messages: list[dict], images: list, videos: list = ()) -> dict:
        with self.prompt_lock:
            try:
                return build_chat_inputs(self.model, messages, images, self.cfg.template, self.cfg.system,
                                         videos=list(videos))
            except ValueError as exc:  # ConversationError and processor errors: the client's fault
                raise _bad(str(exc), "messages", "invalid_conversation") from None

    def gen_kwargs(self, req: ParsedRequest, prompt_tokens: int) -> dict:
        room = self.context_length - prompt_tokens
        if room < 1 and not req.max_tokens_given:
            raise _bad(f"This model's maximum context length is {self.context_length} tokens. However, your "
                       f"messages resulted in {prompt_tokens} tokens, which leaves no room for the completion. "
                       "Please reduce the length of the messages.", "messages", "context_length_exceeded")
        if room < req.max_tokens and req.max_tokens_given:
            raise _bad(f"This model's maximum context length is {self.context_length} tokens. However, you "
                       f"requested {prompt_tokens + req.max_tokens} tokens ({prompt_tokens} in the messages, "
                       f"{req.max_tokens} in the completion). Please reduce the length of the messages or "
                       "completion.", "messages", "context_length_exceeded")
        gen = dict(req.gen)
        gen["max_new_tokens"] = min(req.max_tokens, room)  # no max_tokens: up to the rest of the context
        gen["stop"] = list(dict.fromkeys(self.stops.get("stop", []) + gen["stop"]))
        gen["stop_token_ids"] = list(self.stops.get("stop_token_ids", []))
        return gen

    def submit(self, inputs: dict, gen: dict, on_event) -> EngineRequest:
        return self.batcher.submit(**inputs, **gen, strip=True, on_event=on_event)

    def finished(self, rid: str, req: EngineRequest | None, status: str, messages=None) -> None:
        """Metrics and the one log line of a request that went through the engine."""
        if req is None:
            return
        reason = req.finish_reason or ("error" if req.error is not None else "cancelled")
        self.metrics.observe(req, reason)
        latency = (req.t_done or time.perf_counter()) - req.t_submit
        ttft = f"{req.t_first - req.t_submit:.3f}s" if req.t_first is not None else "-"
        log.info("request %s status=%s finish=%s prompt_tokens=%d completion_tokens=%d image_cache_hits=%d "
                 "ttft=%s latency=%.3fs", rid, status, reason, req.prompt_tokens, req.completion_tokens,
                 req.image_cache_hits, ttft, latency)
        if self.cfg.log_prompts and messages is not None:
            log.info("request %s messages=%s", rid, json.dumps(messages, ensure_ascii=False))


def _usage(req: EngineRequest) -> dict:
    prompt, completion = req.prompt_tokens, req.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens, "image_tokens": req.image_tokens},
            "completion_tokens_details": None}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


# --------------------------------------------------------------------------- the app


def create_app(model, cfg: ServeConfig | None = None, ui: bool = False) -> FastAPI:
    """The FastAPI app serving ``model`` (``ui=True`` also mounts the Gradio page at ``/ui``)."""
    cfg = cfg or ServeConfig()
    cfg.image_limits().allow_in_pil()  # PIL's own bomb guard must not be stricter than ours (checks the values too)
    engine = Engine(model, cfg)
    app = FastAPI(title="mmkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(StatusCounter, metrics=engine.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, msg, _STATUS_TYPES.get(exc.status_code, "invalid_request_error"), None,
                        code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "The server had an error while processing your request; the details are in the "
                             "server log.", "server_error", None, "internal_error").response()

    def _check_key(request: Request) -> None:
        if not cfg.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                           "invalid_request_error", None, "missing_api_key")
        if not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "in_flight": engine.admission.count,
                "running": engine.running, "queued": engine.batcher.queue_depth, "capacity": engine.admission.limit}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        _check_key(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "mmkit"}
            for name in sorted(engine.model_names())]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        _check_key(request)
        if name not in engine.model_names():
            raise APIError(404, f"The model `{name}` does not exist.", "invalid_request_error", "model",
                           "model_not_found")
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "mmkit"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request)
        size = request.headers.get("content-length")
        body_limit = cfg.body_limit(engine.takes_video)
        if size and size.isdigit() and int(size) > body_limit:
            raise APIError(413, f"request body too large: {size} bytes, the limit is {body_limit}",
                           "invalid_request_error", None, "request_too_large")
        chunks, total = [], 0
        async for chunk in request.stream():  # chunked uploads have no content-length: count as we read
            total += len(chunk)
            if total > body_limit:
                raise APIError(413, f"request body too large: more than {body_limit} bytes",
                               "invalid_request_error", None, "request_too_large")
            chunks.append(chunk)
        body = _parse_json(b"".join(chunks))
        req = parse_chat_request(body, cfg, engine.model_names(), engine.image_token, engine.max_tokens_limit,
                                 engine.video_token)
        if req.video_refs and not engine.takes_video:
            raise _bad("this model takes no video (its recipe sets no model.video_token_id)", req.video_refs[0][1],
                       "video_not_supported")

        ticket = engine.admission.try_enter()
        if ticket is None:
            raise APIError(429, f"The server is busy: {engine.admission.limit} requests are already running or "
                                "queued. Please retry shortly.", "rate_limit_error", None, "server_overloaded",
                           headers={"retry-after": "1"})
        handed_over = False
        try:
            images = []
            for url, param in req.image_refs:
                if url[:5].lower() == "data:":
                    data = await asyncio.to_thread(_decode_data_url, url, cfg, param)
                else:
                    data = await _fetch_remote(url, cfg, param)
                images.append(await asyncio.to_thread(_check_image_header, data, cfg, param, engine.image_processor))
            videos = []
            for url, param in req.video_refs:
                if url[:5].lower() == "data:":
                    data = await asyncio.to_thread(_decode_data_url, url, cfg, param, "video")
                else:
                    data = await _fetch_remote(url, cfg, param, "video")
                videos.append(await asyncio.to_thread(_decode_video, data, cfg, param, engine.image_processor))
            inputs = await asyncio.to_thread(engine.build_inputs, req.messages, images, videos)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            gen = engine.gen_kwargs(req, prompt_tokens)
            rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if req.stream:
                loop = asyncio.get_running_loop()
                events: asyncio.Queue = asyncio.Queue()

                def on_event(kind: str, value) -> None:  # called from the scheduler thread
                    loop.call_soon_threadsafe(events.put_nowait, (kind, value))

                handle = _submit(engine, inputs, gen, on_event)
                handed_over = True
                state = {"started": False}

                def release_if_never_started() -> None:  # the body iterator may never run (client gone)
                    if not state["started"]:
                        handle.cancel()
                        engine.finished(rid, handle, "client_gone")
                        ticket.release()

                return StreamingResponse(
                    _stream(engine, handle, events, req, rid, created, ticket, state),
                    media_type="text/event-stream",
                    headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                    background=BackgroundTask(release_if_never_started),
                )
            return await _complete(engine, inputs, gen, rid, created, request, req.messages)
        finally:
            if not handed_over:
                ticket.release()

    if ui:
        from mmkit.serve.ui import mount_ui  # loads gradio: only with --ui

        app = mount_ui(app, model, cfg, engine)
    return app


async def _complete(engine: Engine, inputs: dict, gen: dict, rid: str, created: int, request: Request,
                    messages: list) -> dict:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(kind: str, value) -> None:  # scheduler thread -> event loop; deltas are not needed here
        if kind != "delta":
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    req = _submit(engine, inputs, gen, on_event)
    status = "500"
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody waits for the answer: free the slot
                    req.cancel()
                    status = "client_gone"
                    raise APIError(499, "the client closed the request", "invalid_request_error", None,
                                   "client_closed_request") from None
                continue
            if kind == "error":
                log.error("generation failed for %s", rid, exc_info=value)
                raise APIError(500, "The server had an error while processing your request; the details are in "
                                    "the server log.", "server_error", None, "internal_error")
            break
        status = "200"
    except BaseException:
        req.cancel()
        raise
    finally:
        engine.finished(rid, req, status, messages)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": engine.cfg.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                     "finish_reason": req.finish_reason or "length", "logprobs": None}],
        "usage": _usage(req),
        "system_fingerprint": None,
    }


def _submit(engine: Engine, inputs: dict, gen: dict, on_event) -> EngineRequest:
    try:
        return engine.submit(inputs, gen, on_event)
    except ValueError as exc:  # the engine's own checks of the prompt and options
        raise _bad(str(exc), None, "invalid_request") from None


async def _stream(engine: Engine, handle: EngineRequest, events: asyncio.Queue, req: ParsedRequest, rid: str,
                  created: int, ticket: Ticket, state: dict):
    name = engine.cfg.model_name

    def chunk(delta: dict, finish: str | None = None) -> dict:
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
               "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if req.include_usage:
            out["usage"] = None
        return out

    state["started"] = True
    status = "client_gone"
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _sse(chunk({"content": value}))
            elif kind == "done":
                yield _sse(chunk({}, handle.finish_reason or "length"))
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                "system_fingerprint": None, "choices": [], "usage": _usage(handle)})
                status = "200"
                break
            else:
                log.error("generation failed for %s", rid, exc_info=value)
                status = "500"
                yield _sse({"error": {"message": "The server had an error while generating; the details are in the "
                                                 "server log.", "type": "server_error", "param": None,
                                      "code": "internal_error"}})
                break
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()  # a client that went away frees its slot at the next step (no-op when finished)
        engine.finished(rid, handle, status, req.messages)
        ticket.release()
