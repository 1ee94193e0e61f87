"""Load test of ``python -m mmkit.serve`` on loopback: N concurrent clients, throughput and latency.

    python benchmarks/bench_serve.py [--clients 4] [--requests 8] [--max-tokens 32] [--model DIR]

Starts the server as a subprocess (the tiny demo model, random init, unless --model is given),
then N clients each send R chat requests (an image + a question, greedy, ``ignore_eos`` so every
request generates exactly --max-tokens tokens) back to back. The queue bound (concurrency +
queue size) is set at least N, so the expected error count is 0 (asserted). Prints requests/s,
generated tokens/s, p50/p99 latency, p50 time to first streamed token (--stream), errors and the
machine. CPU numbers on a shared box; nothing here says anything about GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def tiny_model_dir(path: Path) -> Path:
    import torch

    import mmkit

    torch.manual_seed(0)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml").eval()
    model.save(path)
    return path


def image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def client(http, base, n_requests, body, stream, lat, ttft, errors, tokens):
    import json

    for _ in range(n_requests):
        t0 = time.perf_counter()
        try:
            if stream:
                first = None
                async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and first is None and '"content": "' in line \
                                and '"content": ""' not in line:
                            first = time.perf_counter()
                        if line.startswith("data: {") and '"usage": {' in line:
                            tokens.append(json.loads(line[6:])["usage"]["completion_tokens"])
                if first is not None:
                    ttft.append(first - t0)
            else:
                r = await http.post(base + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(r.status_code)
                    continue
                tokens.append(r.json()["usage"]["completion_tokens"])
        except Exception as exc:  # noqa: BLE001 - counted, reported
            errors.append(type(exc).__name__)
            continue
        lat.append(time.perf_counter() - t0)


async def run_load(base, args, body):
    import httpx

    lat, ttft, errors, tokens = [], [], [], []
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http, base, args.requests, body, args.stream, lat, ttft, errors, tokens)
                               for _ in range(args.clients)])
        wall = time.perf_counter() - t0
    return lat, ttft, errors, tokens, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: the tiny demo model, random init)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=2, help="server --concurrency")
    ap.add_argument("--stream", action="store_true", help="use SSE streaming (measures time to first token)")
    args = ap.parse_args(argv)

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    machine_info()
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else tiny_model_dir(Path(tmp.name) / "tiny")
    port = free_port()
    queue = max(0, args.clients - args.concurrency) + 1  # bound >= clients: no 429 expected
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mmkit.serve", "--model", str(model_dir), "--port", str(port), "--model-name",
           "bench", "--concurrency", str(args.concurrency), "--queue-size", str(queue), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": args.stream, "stream_options": {"include_usage": True} if args.stream else None,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url()}},
                    {"type": "text", "text": "what color is the shape ?"}]}]}
        # warm-up
        httpx.post(base + "/v1/chat/completions", json={**body, "stream": False, "stream_options": None},
                   timeout=120).raise_for_status()
        lat, ttft, errors, tokens, wall = asyncio.run(run_load(base, args, body))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    n = len(lat)
    print(f"server: --concurrency {args.concurrency} --queue-size {queue}; {args.clients} clients x {args.requests} "
          f"requests, {args.max_tokens} tokens each, {'streaming' if args.stream else 'non-streaming'}")
    print(f"completed {n}, errors {len(errors)} {sorted(set(map(str, errors))) if errors else ''}")
    print(f"throughput: {n / wall:.2f} req/s, {sum(tokens) / wall:.1f} generated tok/s (wall {wall:.2f} s)")
    print(f"latency: p50 {percentile(lat, 50) * 1e3:.0f} ms, p99 {percentile(lat, 99) * 1e3:.0f} ms, "
          f"mean {statistics.mean(lat) * 1e3 if lat else float('nan'):.0f} ms")
    if ttft:
        print(f"time to first token: p50 {percentile(ttft, 50) * 1e3:.0f} ms, p99 {percentile(ttft, 99) * 1e3:.0f} ms")
    assert not errors, f"{len(errors)} errors below the queue bound"
    return 0


if __name__ == "__main__":
    sys.exit(main())
