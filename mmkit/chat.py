"""``python -m mmkit.chat --model DIR --image PATH [--query TEXT]`` (also ``mmkit-chat``): chat about an image.

The library side (``chat``, ``stream_chat``, ``ChatHistory``) is ``mmkit.infer.chat``. This module imports
only the standard library at the top, so ``--help`` and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from mmkit.processing.budget import ImageLimits, add_image_limit_flags, limits_from_args
from mmkit.processing.video import VideoOptions, add_video_flags, decode_video, options_from_args

__all__ = ["build_parser", "load_model_for_inference", "main"]

HELP_COMMANDS = ("commands: /reset (forget the conversation), /image PATH (new image, new conversation), "
                 "/video PATH (new video, new conversation), /exit")
DEFAULT_MAX_NEW_TOKENS = 256  # as mmkit.infer.chat.DEFAULT_MAX_NEW_TOKENS (not imported: it would load torch)


def load_model_for_inference(path: str, dtype: str | None = None, load_4bit: bool = False, load_8bit: bool = False,
                             device: str | None = None):
    """``mmkit.load`` + optional device move and quantization, in eval mode."""
    if load_4bit and load_8bit:
        raise SystemExit("error: --load-4bit and --load-8bit are mutually exclusive")
    # heavy: torch and transformers load here, after the command line has been parsed
    import mmkit
    from mmkit.quant import quantize_from_flags

    kwargs = {"dtype": dtype} if dtype else {}
    model = mmkit.load(path, device=device or None, **kwargs).eval()
    report = quantize_from_flags(model, load_4bit=load_4bit, load_8bit=load_8bit)
    if report is not None:
        print(f"[mmkit] {report}", file=sys.stderr)  # the memory before/after quantization
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
    p.add_argument("--video", help="video file to talk about instead (mp4, mkv, webm, ...: what PyAV decodes; "
                                   "/video PATH switches it)")
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
    add_image_limit_flags(p)
    add_video_flags(p)
    return p


def _open_image(path: str, limits: ImageLimits | None = None, image_processor=None):
    """Decoded RGB, the image budget checked from the header first (``image_processor``: also the size after
    the model's resize/pad; before the model is loaded it is None)."""
    return (limits or ImageLimits()).open(path, image_processor)


def _open_video(path: str, model, limits: ImageLimits | None = None, options: VideoOptions | None = None):
    """Sampled frames (a ``DecodedVideo``), each frame held to the image budget; raises ValueError / OSError."""
    image_processor = getattr(getattr(model, "processor", None), "image_processor", None)
    if getattr(model, "video_token_id", None) is None:
        raise ValueError("this model takes no video (model.video_token_id is not set in its recipe)")
    return decode_video(path, options, limits or ImageLimits(), image_processor, name=path)


def _interactive(model, image, gen: dict, template, system, out=None, inp=None, engine=None,
                 limits: ImageLimits | None = None, video_options: VideoOptions | None = None) -> None:
    from mmkit.infer.engine import Engine  # heavy (torch); the model is loaded by now anyway

    if engine is not None:
        return _session(model, image, gen, template, system, out, inp, engine, limits, video_options)
    # ours: stopped before returning (its scheduler thread must not be running torch at interpreter exit, which
    # aborts the process: "terminate called without an active exception")
    engine = Engine(model, max_batch_size=1)
    try:
        return _session(model, image, gen, template, system, out, inp, engine, limits, video_options)
    finally:
        engine.close()


def _session(model, image, gen: dict, template, system, out, inp, engine, limits, video_options) -> None:
    """The interactive loop of :func:`_interactive` on a running ``engine``."""
    from mmkit.infer.chat import stream_chat  # heavy (torch); the model is loaded by now anyway

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
                    new = _open_image(path, limits, model.processor.image_processor)
                except Exception as exc:  # keep the session alive
                    print(f"[mmkit] cannot open image {path!r}: {exc}", file=out, flush=True)
                    continue
                image, pending_image, history = new, new, None
                print(f"[mmkit] new image {path}; conversation reset", file=out, flush=True)
                continue
            if cmd == "/video":
                path = arg.strip()
                try:
                    new = _open_video(path, model, limits, video_options)
                except Exception as exc:  # keep the session alive
                    print(f"[mmkit] cannot open video {path!r}: {exc}", file=out, flush=True)
                    continue
                image, pending_image, history = new, new, None
                print(f"[mmkit] new video {path} ({len(new.frames)} frames of {new.duration:.2f} s); "
                      "conversation reset", file=out, flush=True)
                continue
            print(f"[mmkit] unknown command {cmd!r}; {HELP_COMMANDS}", file=out, flush=True)
            continue
        print("ASSISTANT: ", end="", file=out, flush=True)
        try:
            stream = stream_chat(model, pending_image, line, history, template=template, system=system,
                                 engine=engine, **gen)
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
    if args.image and args.video:
        print("error: --image and --video: give one of them", file=sys.stderr)
        return 2
    try:
        limits = limits_from_args(args)
        video_options = options_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image = None
    if args.image:
        try:
            image = _open_image(args.image, limits)
        except Exception as exc:
            print(f"error: --image {args.image}: {exc}", file=sys.stderr)
            return 2
    model = load_model_for_inference(args.model, args.dtype, args.load_4bit, args.load_8bit, args.device)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files; chat needs one", file=sys.stderr)
        return 2
    if image is not None:  # the size after this model's resize/pad, before any resize runs
        try:
            limits.check_size(image.width, image.height, model.processor.image_processor)
        except ValueError as exc:
            print(f"error: --image {args.image}: {exc}", file=sys.stderr)
            return 2
    if args.video:
        try:
            image = _open_video(args.video, model, limits, video_options)
        except Exception as exc:  # one line; interactive chat goes on without the video
            print(f"error: --video {args.video}: {exc}", file=sys.stderr)
            if args.query is not None:
                return 2
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    if args.query is not None:
        from mmkit.infer.chat import chat  # heavy (torch); loaded with the model already
        from mmkit.infer.engine import Engine  # heavy (torch), as above

        engine = Engine(model, max_batch_size=1)
        try:
            reply, _ = chat(model, image, args.query, template=args.template, system=args.system, engine=engine,
                            **gen)
        finally:  # the scheduler thread must not outlive the command (see _interactive)
            engine.close()
        print(reply, flush=True)
        return 0
    try:
        _interactive(model, image, gen, args.template, args.system, limits=limits, video_options=video_options)
    except KeyboardInterrupt:
        print(file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
