"""``python -m mmkit.serve --model DIR``: the OpenAI-compatible server (see ``mmkit.serve.app``).

Only argparse and ``mmkit.serve.config`` are imported before the arguments are parsed, so ``--help``
answers without loading torch, fastapi or uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from mmkit.processing.budget import add_image_limit_flags
from mmkit.processing.video import add_video_flags
from mmkit.serve.config import ServeConfig, parse_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkit.serve",
        description="Serve a vision-language model over an OpenAI-compatible API: POST /v1/chat/completions "
                    "(text + image_url parts, SSE streaming), GET /v1/models, GET /health, GET /metrics "
                    "(Prometheus); --ui adds a web chat page at /ui. Requests are batched continuously.",
    )
    p.add_argument("--model", required=True, help="model directory (mmkit run dir, llava-hf or original LLaVA)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s (loopback only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", default=os.environ.get("MMKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MMKIT_API_KEY, else no key)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default: %(default)s)")
    add_image_limit_flags(p)
    p.add_argument("--max-videos", type=int, default=1, help="video_url parts per request (default: %(default)s)")
    add_video_flags(p)
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for a batch slot; beyond it the server answers 429 "
                        "(default: %(default)s)")
    p.add_argument("--max-batch-size", "--concurrency", dest="concurrency", type=int, default=16,
                   help="requests generating at once: the batching engine's slots (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=512,
                   help="prompt tokens prefilled per engine step; longer prompts are prefilled in chunks between "
                        "decode steps (default: %(default)s)")
    p.add_argument("--image-cache-size", type=parse_size, default="256MiB",
                   help="bytes of image features kept for reuse (LRU; 0 = off; default: 256MiB)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; on a CPU shared with other work, fewer threads "
                        "can be faster)")
    p.add_argument("--forward-threads", type=int, default=1,
                   help="forward passes at once: a prefill chunk beside the decode step, or the decode batch split "
                        "in two (with --threads 1 on a small CPU; default: %(default)s)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute every prompt (default: a prompt prefix that another running or just finished "
                        "request already computed is copied from its KV slot)")
    p.add_argument("--log-prompts", action="store_true",
                   help="also log each request's messages (off: one line per request with id, status, tokens, "
                        "latency)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off by default: only base64 data URLs; file:// is never allowed)")
    p.add_argument("--remote-timeout", type=float, default=5.0, help="seconds per remote image (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the context length)")
    p.add_argument("--default-max-tokens", type=int, default=512, help="when a request gives none (default: 512)")
    p.add_argument("--default-temperature", type=float, default=1.0,
                   help="when a request gives none (default: 1.0, as OpenAI; 0 = greedy)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's)")
    p.add_argument("--system", default=None, help="system prompt when a request has none (default: the template's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: the model's)")
    p.add_argument("--device", default=None, help="torch device (default: CPU)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-4bit", action="store_true", help="quantize the LLM to 4-bit NF4 (bitsandbytes)")
    q.add_argument("--load-8bit", action="store_true", help="quantize the LLM to 8-bit LLM.int8 (bitsandbytes)")
    p.add_argument("--ui", action="store_true", help="also serve a Gradio chat page at /ui")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def config_from_args(args) -> ServeConfig:
    return ServeConfig(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or None,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_pixels,
        max_image_aspect=args.max_image_aspect,
        max_resized_pixels=args.max_resized_pixels,
        queue_size=args.queue_size,
        concurrency=args.concurrency,
        max_batch_tokens=args.max_batch_tokens,
        image_cache_bytes=args.image_cache_size,
        log_prompts=args.log_prompts,
        forward_threads=args.forward_threads,
        prefix_cache=args.prefix_cache,
        allow_remote_images=args.allow_remote_images,
        remote_timeout=args.remote_timeout,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        default_temperature=args.default_temperature,
        template=args.template,
        system=args.system,
        max_videos=args.max_videos,
        max_video_bytes=args.max_video_bytes,
        video_frames=args.video_frames,
        video_fps=args.video_fps,
        video_max_frames=args.video_max_frames,
        max_video_decode_frames=args.max_video_decode_frames,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    for name, value in (("--max-images", args.max_images), ("--max-batch-size", args.concurrency),
                        ("--max-pixels", args.max_pixels), ("--max-resized-pixels", args.max_resized_pixels),
                        ("--max-image-bytes", args.max_image_bytes), ("--max-image-aspect", args.max_image_aspect),
                        ("--max-batch-tokens", args.max_batch_tokens),
                        ("--forward-threads", args.forward_threads)):
        if value < 1:
            print(f"error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        config_from_args(args).video_options()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.queue_size < 0:
        print(f"error: --queue-size must be >= 0, got {args.queue_size}", file=sys.stderr)
        return 2
    if not Path(args.model).exists():
        print(f"error: --model {args.model}: no such directory", file=sys.stderr)
        return 2
    if args.ui:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # heavy: fastapi, uvicorn and torch load only once the arguments are known to be good
    import uvicorn

    import mmkit
    from mmkit.serve.app import create_app

    if args.load_4bit and args.load_8bit:
        print("error: --load-4bit and --load-8bit are mutually exclusive", file=sys.stderr)
        return 2
    from mmkit.quant import quantize_from_flags  # heavy (torch): after the arguments are checked

    if args.threads:
        import torch  # loaded by now (mmkit.quant): only to set the thread count

        torch.set_num_threads(args.threads)

    model = mmkit.load(args.model, device=args.device or None, **({"dtype": args.dtype} if args.dtype else {})).eval()
    report = quantize_from_flags(model, load_4bit=args.load_4bit, load_8bit=args.load_8bit)
    if report is not None:
        print(f"[mmkit] {report}", file=sys.stderr)  # the memory before/after quantization
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files; the server needs one", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    app = create_app(model, cfg, ui=args.ui)
    logging.getLogger("mmkit.serve").info(
        "serving %s on http://%s:%d (OpenAI API at /v1%s)", cfg.model_name, args.host, args.port,
        ", web UI at /ui" if args.ui else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
