"""Multi-turn chat with a VisionLanguageModel (the command line, ``python -m mmkit.chat``, is ``mmkit.chat``).

    reply, history = chat(model, image, "What is in the picture?")
    reply, history = chat(model, None, "And what colour is it?", history=history)   # the image stays

``history`` (a :class:`ChatHistory`) holds the messages so far and the images they refer to; each
call returns a new one and never changes the one passed in. The prompt is rendered with the
model's template (``model.template``, from the recipe) unless ``template=`` says otherwise, and
generation stops at the template's end-of-turn strings/tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mmkit.infer import generate as decoding  # decoding.stream_generate: looked up per call, tests swap it
from mmkit.infer.engine import EngineRequest
from mmkit.infer.generate import GenerationStream, generate
from mmkit.processing.budget import ImageLimits
from mmkit.processing.video import DecodedVideo, time_instruction
from mmkit.templates import get_template

__all__ = ["ChatHistory", "ChatStream", "chat", "stream_chat", "build_chat_inputs", "stop_options"]

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatHistory:
    """The conversation so far: ``messages`` ([{"role", "content"}], images as ``<image>`` and videos as
    ``<video>`` in user turns), ``images`` (PIL images) and ``videos`` (:class:`DecodedVideo`), each in the
    order of its placeholders."""

    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    system: str | None = None
    videos: list = field(default_factory=list)

    def copy(self) -> "ChatHistory":
        return ChatHistory([dict(m) for m in self.messages], list(self.images), self.system, list(self.videos))

    def __len__(self) -> int:
        return len(self.messages)

    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs, placeholders removed: handy for UIs."""
        out = []
        msgs = self.messages
        for i in range(0, len(msgs) - 1, 2):
            text = msgs[i]["content"].replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
            out.append((text.strip(), msgs[i + 1]["content"]))
        return out


def _as_history(history) -> ChatHistory:
    if history is None:
        return ChatHistory()
    if isinstance(history, ChatHistory):
        return history.copy()
    if isinstance(history, (list, tuple)):  # plain messages, no images
        return ChatHistory([dict(m) for m in history], [])
    raise TypeError(f"history must be a ChatHistory (as returned by chat) or a list of messages, "
                    f"got {type(history).__name__}")


def _load_image(image):
    if image is None or isinstance(image, DecodedVideo):
        return image
    if isinstance(image, (str, Path)):  # a file: the image budget's defaults, checked before the decode
        return ImageLimits().open(image)
    if hasattr(image, "convert"):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}")


def _user_turn(text: str, image) -> str:
    if isinstance(image, DecodedVideo):
        return text if VIDEO_PLACEHOLDER in text else f"{VIDEO_PLACEHOLDER}\n{text}"
    if image is not None and IMAGE_PLACEHOLDER not in text:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return text


def stop_options(model, template: str | None = None) -> dict:
    """``stop`` strings and ``stop_token_ids`` for the model's template (eos is always added by generate)."""
    tok = model.tokenizer
    tpl = get_template(template or model.template)
    stops = [s for s in tpl.get_stop_strings(tok) if s]
    return {"stop": stops, "stop_token_ids": tpl.stop_token_ids(tok) if tok is not None else []}


def build_chat_inputs(model, messages: Sequence[dict], images: Sequence = (), template: str | None = None,
                      system: str | None = None, videos: Sequence = ()) -> dict:
    """Messages ending with a user turn (+ images, + videos: :class:`DecodedVideo` or lists of frames, one per
    ``<video>``) -> generate() inputs for one prompt (batch of 1)."""
    msgs = [dict(m) for m in messages]
    if system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    if videos:
        return _video_chat_inputs(model, msgs, list(images), list(videos), template)
    enc = model.processor.encode_messages(msgs, images=list(images), template=template)
    ids = enc["input_ids"]
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if enc.get("pixel_values") is not None and len(enc["pixel_values"]):
        out["pixel_values"] = enc["pixel_values"]
        out["image_sizes"] = enc.get("image_sizes")
    return out


def trained_with_time_instruction(recipe) -> bool:
    """Whether the recipe's video data (``data.video`` or a stage's) put LLaVA-Video's time instruction after the
    placeholder: then prompts at inference get it too, as the model saw in training."""
    datas = [getattr(recipe, "data", None)] + [getattr(s, "data", None) for s in getattr(recipe, "stages", [])]
    return any(getattr(getattr(d, "video", None), "time_instruction", False) for d in datas if d is not None)


def _video_chat_inputs(model, msgs: list[dict], images: list, videos: list, template) -> dict:
    """Prompts with videos: each placeholder (``<image>`` or the recipe's video token) in order gets its rows,
    and the features are computed here (images per image, videos pooled as OneVision does:
    ``model.encode_videos``), so generate() / the engine only splice ``image_features`` in at the image token."""
    proc = model.processor
    video_token = getattr(model.recipe.model, "video_token", VIDEO_PLACEHOLDER) or VIDEO_PLACEHOLDER
    if getattr(model, "video_token_id", None) is None:
        raise ValueError("this model takes no video (model.video_token_id is not set in its recipe)")
    image_token = proc.image_token
    timed = trained_with_time_instruction(model.recipe)
    order = []  # "i" / "v" per placeholder, in prompt order
    for m in msgs:
        text, out, k = m.get("content") or "", [], 0
        while True:
            i, v = text.find(image_token, k), text.find(video_token, k)
            if i < 0 and v < 0:
                break
            if v < 0 or 0 <= i < v:
                order.append("i")
                out.append(text[k:i + len(image_token)])
                k = i + len(image_token)
            else:
                out.append(text[k:v] + image_token)  # one placeholder kind: the features are given
                n = order.count("v")  # this video's place among the videos
                if timed and n < len(videos) and isinstance(videos[n], DecodedVideo):
                    out.append("\n" + time_instruction(videos[n]))  # where training put it (mmkit.data.records)
                order.append("v")
                k = v + len(video_token)
        m["content"] = "".join(out) + text[k:]
    if order.count("i") != len(images) or order.count("v") != len(videos):
        raise ValueError(f"the messages have {order.count('i')} {image_token} and {order.count('v')} {video_token} "
                         f"placeholders, but {len(images)} images and {len(videos)} videos were given")
    pix = proc.process_images(images)
    vid = proc.process_videos([v.frames if isinstance(v, DecodedVideo) else list(v) for v in videos])
    counts, feats, ii, vi = [], [], 0, 0
    with torch.inference_mode():
        for kind in order:
            if kind == "i":
                counts.append(pix["num_tokens"][ii])
                feats.append(model.encode_images([pix["pixel_values"][ii]], [pix["image_sizes"][ii]]))
                ii += 1
            else:
                counts.append(vid["num_tokens"][vi])
                feats.append(model.encode_videos([vid["pixel_values_videos"][vi]]))
                vi += 1
    ids = proc.encode_ids_with_counts(proc.with_system(msgs), counts, template)
    ids = torch.tensor(ids, dtype=torch.long)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_features": torch.cat(feats, dim=0)}


def _gen_kwargs(model, template, kwargs: dict) -> dict:
    gen = dict(kwargs)
    gen.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    stops = stop_options(model, template)
    extra_stop = gen.pop("stop", None)
    extra_stop = [extra_stop] if isinstance(extra_stop, str) else list(extra_stop or [])
    gen["stop"] = list(dict.fromkeys(stops.get("stop", []) + extra_stop))
    gen["stop_token_ids"] = list(dict.fromkeys(list(stops.get("stop_token_ids", [])) +
                                               list(gen.get("stop_token_ids") or [])))
    return gen


def _next_history(model, image, text: str, history, system: str | None) -> ChatHistory:
    if model.tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this model has none")
    hist = _as_history(history)
    if system is not None:
        hist.system = system
    image = _load_image(image)
    hist.messages.append({"role": "user", "content": _user_turn(text, image)})
    if isinstance(image, DecodedVideo):
        hist.videos.append(image)
    elif image is not None:
        hist.images.append(image)
    return hist


def chat(model, image, text: str, history=None, *, template: str | None = None, system: str | None = None,
         engine=None, **gen_kwargs) -> tuple[str, ChatHistory]:
    """One chat step: returns ``(reply, history)``; pass ``history`` back for the next turn.

    ``image`` (PIL image or path, or None) is attached to this user turn; images of earlier turns
    stay in context through ``history``. ``gen_kwargs`` go to :func:`mmkit.infer.generate.generate`
    (greedy by default; ``max_new_tokens`` defaults to 256). With ``engine`` (a
    :class:`mmkit.infer.engine.Engine` on ``model``) the turn runs in its batch.
    """
    hist = _next_history(model, image, text, history, system)
    inputs = build_chat_inputs(model, hist.messages, hist.images, template, hist.system, videos=hist.videos)
    if engine is not None:
        reply = engine.generate(**inputs, strip=True, **_gen_kwargs(model, template, gen_kwargs)).text
    else:
        reply = generate(model, **inputs, return_text=True, **_gen_kwargs(model, template, gen_kwargs))[0].strip()
    hist.messages.append({"role": "assistant", "content": reply})
    return reply, hist


class ChatStream:
    """Iterator of reply deltas; once exhausted, ``reply`` and ``history`` (with the answer) are set."""

    def __init__(self, model, hist: ChatHistory, stream: GenerationStream | EngineRequest):
        self._hist = hist
        self._stream = stream
        self.reply: str | None = None
        self.history: ChatHistory | None = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        for delta in self._stream:
            if not self._started:  # templates put a space before answers: drop it from the first delta
                delta = delta.lstrip()
                if not delta:
                    continue
                self._started = True
            yield delta
        self._finish()

    def _finish(self) -> None:
        if self.history is None:
            self.reply = self._stream.text.strip()
            hist = self._hist.copy()
            hist.messages.append({"role": "assistant", "content": self.reply})
            self.history = hist

    def close(self) -> None:
        self._stream.close()
        self._finish()

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason


def stream_chat(model, image, text: str, history=None, *, template: str | None = None, system: str | None = None,
                engine=None, **gen_kwargs) -> ChatStream:
    """Like :func:`chat` but streams: ``for delta in s: ...``; then ``s.reply`` and ``s.history``."""
    hist = _next_history(model, image, text, history, system)
    inputs = build_chat_inputs(model, hist.messages, hist.images, template, hist.system, videos=hist.videos)
    if engine is not None:
        stream = engine.submit(**inputs, strip=True, **_gen_kwargs(model, template, gen_kwargs))
    else:
        stream = decoding.stream_generate(model, **inputs, **_gen_kwargs(model, template, gen_kwargs))
    return ChatStream(model, hist, stream)
