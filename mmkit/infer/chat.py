"""Multi-turn chat with a VisionLanguageModel, and the ``python -m mmkit.chat`` command line.

    reply, history = chat(model, image, "What is in the picture?")
    reply, history = chat(model, None, "And what colour is it?", history=history)   # the image stays

``history`` (a :class:`ChatHistory`) holds the messages so far and the images they refer to; each
call returns a new one and never changes the one passed in. The prompt is rendered with the
model's template (``model.template``, from the recipe) unless ``template=`` says otherwise, and
generation stops at the template's end-of-turn strings/tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mmkit.infer.generate import GenerationStream, generate

__all__ = ["ChatHistory", "ChatStream", "chat", "stream_chat", "build_chat_inputs", "stop_options", "main"]

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatHistory:
    """The conversation so far: ``messages`` ([{"role", "content"}], images as ``<image>`` in user turns)
    and ``images`` (PIL images, in the order of their placeholders)."""

    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    system: str | None = None

    def copy(self) -> "ChatHistory":
        return ChatHistory([dict(m) for m in self.messages], list(self.images), self.system)

    def __len__(self) -> int:
        return len(self.messages)

    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs, placeholders removed: handy for UIs."""
        out = []
        msgs = self.messages
        for i in range(0, len(msgs) - 1, 2):
            out.append((msgs[i]["content"].replace(IMAGE_PLACEHOLDER, "").strip(), msgs[i + 1]["content"]))
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
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            return im.convert("RGB")
    if hasattr(image, "convert"):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image
    raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}")


def _user_turn(text: str, image) -> str:
    if image is not None and IMAGE_PLACEHOLDER not in text:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return text


def stop_options(model, template: str | None = None) -> dict:
    """``stop`` strings and ``stop_token_ids`` for the model's template (eos is always added by generate)."""
    tok = model.tokenizer
    try:
        from mmkit.templates import get_template
    except ImportError:  # no templates module: eos only
        return {}
    tpl = get_template(template or model.template)
    stops = [s for s in tpl.get_stop_strings(tok) if s]
    return {"stop": stops, "stop_token_ids": tpl.stop_token_ids(tok) if tok is not None else []}


def build_chat_inputs(model, messages: Sequence[dict], images: Sequence = (), template: str | None = None,
                      system: str | None = None) -> dict:
    """Messages ending with a user turn (+ images) -> generate() inputs for one prompt (batch of 1)."""
    msgs = [dict(m) for m in messages]
    if system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
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
    if image is not None:
        hist.images.append(image)
    return hist


def chat(model, image, text: str, history=None, *, template: str | None = None, system: str | None = None,
         **gen_kwargs) -> tuple[str, ChatHistory]:
    """One chat step: returns ``(reply, history)``; pass ``history`` back for the next turn.

    ``image`` (PIL image or path, or None) is attached to this user turn; images of earlier turns
    stay in context through ``history``. ``gen_kwargs`` go to :func:`mmkit.infer.generate.generate`
    (greedy by default; ``max_new_tokens`` defaults to 256).
    """
    hist = _next_history(model, image, text, history, system)
    inputs = build_chat_inputs(model, hist.messages, hist.images, template, hist.system)
    reply = generate(model, **inputs, return_text=True, **_gen_kwargs(model, template, gen_kwargs))[0].strip()
    hist.messages.append({"role": "assistant", "content": reply})
    return reply, hist


class ChatStream:
    """Iterator of reply deltas; once exhausted, ``reply`` and ``history`` (with the answer) are set."""

    def __init__(self, model, hist: ChatHistory, stream: GenerationStream):
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
                **gen_kwargs) -> ChatStream:
    """Like :func:`chat` but streams: ``for delta in s: ...``; then ``s.reply`` and ``s.history``."""
    from mmkit.infer.generate import stream_generate

    hist = _next_history(model, image, text, history, system)
    inputs = build_chat_inputs(model, hist.messages, hist.images, template, hist.system)
    stream = stream_generate(model, **inputs, **_gen_kwargs(model, template, gen_kwargs))
    return ChatStream(model, hist, stream)


# --------------------------------------------------------------------------- command line

HELP_COMMANDS = "commands: /reset (forget the conversation), /image PATH (new image, new conversation), /exit"


def load_model_for_inference(path: str, dtype: str | None = None, load_4bit: bool = False, load_8bit: bool = False,
                             device: str | None = None):
    """``mmkit.load`` + optional device move and quantization, in eval mode."""
    import mmkit
    from mmkit.quant import quantize_from_flags

    if load_4bit and load_8bit:
        raise SystemExit("error: --load-4bit and --load-8bit are mutually exclusive")
    kwargs = {"dtype": dtype} if dtype else {}
    model = mmkit.load(path, **kwargs).eval()
    if device:
        model.to(device)
    report = quantize_from_flags(model, load_4bit=load_4bit, load_8bit=load_8bit)
    if report is not None:
        print(f"[mmkit] {report}", file=sys.stderr)
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkit.chat",
        description="Chat with an mmkit / llava-hf / original-LLaVA model about an image. With --query: print one "
                    "answer and exit. Without: interactive multi-turn chat (tokens stream as they are generated). "
                    + HELP_COMMANDS,
    )
    p.add_argument("--model", required=True, help="model directory (mmkit run dir, llava-hf or original LLaVA)")
    p.add_argument("--image", help="image file to talk about (optional; /image PATH switches it)")
    p.add_argument("--query", help="ask this one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--template", default=None, help="conversation template (default: the model's)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: the model's)")
    p.add_argument("--device", default=None, help="torch device (default: where the model loads, CPU)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-4bit", action="store_true", help="quantize the LLM to 4-bit NF4 (bitsandbytes)")
    q.add_argument("--load-8bit", action="store_true", help="quantize the LLM to 8-bit LLM.int8 (bitsandbytes)")
    return p


def _interactive(model, image, gen: dict, template, system, out=None, inp=None) -> None:
    out = out if out is not None else sys.stdout
    inp = inp if inp is not None else sys.stdin
    history = None
    pending_image = image
    print(f"[mmkit] {HELP_COMMANDS}", file=out, flush=True)
    while True:
        print("USER: ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:  # EOF
            print(file=out, flush=True)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                history, pending_image = None, image
                print("[mmkit] conversation reset", file=out, flush=True)
                continue
            if cmd == "/image":
                path = arg.strip()
                try:
                    new = _load_image(path)
                except Exception as exc:  # keep the session alive
                    print(f"[mmkit] cannot open image {path!r}: {exc}", file=out, flush=True)
                    continue
                image, pending_image, history = new, new, None
                print(f"[mmkit] new image {path}; conversation reset", file=out, flush=True)
                continue
            print(f"[mmkit] unknown command {cmd!r}; {HELP_COMMANDS}", file=out, flush=True)
            continue
        print("ASSISTANT: ", end="", file=out, flush=True)
        try:
            stream = stream_chat(model, pending_image, line, history, template=template, system=system, **gen)
            for delta in stream:
                print(delta, end="", file=out, flush=True)
        except Exception as exc:  # a bad turn (e.g. too long) must not end the session
            logging.getLogger(__name__).debug("chat turn failed", exc_info=True)
            print(f"\n[mmkit] error: {exc}", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history, pending_image = stream.history, None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    if not Path(args.model).exists():
        print(f"error: --model {args.model}: no such directory", file=sys.stderr)
        return 2
    image = None
    if args.image:
        try:
            image = _load_image(args.image)
        except Exception as exc:
            print(f"error: --image {args.image}: {exc}", file=sys.stderr)
            return 2
    model = load_model_for_inference(args.model, args.dtype, args.load_4bit, args.load_8bit, args.device)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files; chat needs one", file=sys.stderr)
        return 2
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    if args.query is not None:
        reply, _ = chat(model, image, args.query, template=args.template, system=args.system, **gen)
        print(reply, flush=True)
        return 0
    try:
        _interactive(model, image, gen, args.template, args.system)
    except KeyboardInterrupt:
        print(file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
