"""Serving under concurrent load: ``mmkit.serve`` (batching engine) vs ``transformers serve`` vs mmkit's
previous thread-per-request server, the same llava-hf model, the same requests, side by side in one run.

    python benchmarks/bench_serve.py [--levels 1,4,16,32] [--requests 32] [--max-tokens 32] [--rounds 2]
                                     [--servers mmkit,mmkit-noprefix,transformers,landed] [--landed-rev 61a615b]

The script writes a random-init llava-hf model (CLIP 112 px -> 64 image tokens, Llama 6 x 512, a byte-level
BPE tokenizer trained here, ~24M parameters; the LM-head rows of the special tokens are zeroed so that no
server stops early), with a LlavaProcessor and a vicuna-style chat template, so that both mmkit and
transformers load the same directory; the mmkit servers get ``--system ""`` so that their prompt is
the chat template's (76-77 tokens, 64 of them the image). Each server runs as a subprocess on
loopback, all of them at once; each level runs every server in turn, ``--rounds`` times with the order
rotated (a shared machine's load drifts; this spreads it over all servers), and sums the rounds. For each
concurrency level, that many clients send a fixed total of requests
(max(--requests, level); an image + a question, greedy, ``max_tokens`` tokens each, streamed with
``include_usage``). Reported per server and level: generated tokens/s and
requests/s (over the level's wall time), time to first token p50/p99 (request sent -> first content
chunk), per-token latency p50/p99 (per request: (last chunk - first chunk) / (tokens - 1)) and errors.

The 4 prompts repeat (many users asking about the same image), so mmkit's prefix reuse copies most
of a prompt's keys/values from an earlier request's slot; "mmkit-noprefix" is the same server with
``--no-prefix-cache`` (every prompt computed), to show what that reuse is worth.
"landed" is the server at ``--landed-rev`` (thread per request, ``--concurrency 4``), run from a
``git archive`` of that revision. ``transformers serve`` gets ``--continuous-batching``; it falls back
to sequential generation for a Llava model (its ``use_continuous_batching`` accepts text-only
models), which the printed table says. CPU numbers on a shared box; nothing here says anything
about GPUs. No time is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ['image', 'image_url'] %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


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


# --------------------------------------------------------------------------- the model


def _tokenizer(vocab: int):
    # heavy: only when the model is written
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syll = ["ka", "to", "ri", "men", "sa", "lo", "qui", "ver", "an", "el", "or", "us", "th", "ch", "sh", "ng"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    corpus += ["what color is the shape in the picture ? describe the image . USER: ASSISTANT:"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.add_tokens(["<image>"], special_tokens=True)
    return fast


def write_model(path: Path, seed: int = 0) -> dict:
    """A random llava-hf model + processor that both mmkit and transformers load."""
    import torch  # heavy: only when the model is written
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(4000)
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=112, patch_size=14),
        text_config=LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=2048,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        head = hf.get_output_embeddings().weight
        for i in (0, 1, 2, image_id):  # never generated: every server runs to max_tokens
            head[i].zero_()
    hf.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {"params_m": sum(p.numel() for p in hf.parameters()) / 1e6, "vocab": len(tok)}


def image_url(k: int) -> str:
    from PIL import Image  # only when a request is built

    buf = io.BytesIO()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    Image.new("RGB", (96 + 8 * k, 80), colors[k % 4]).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- servers


def start(kind: str, model_dir: Path, port: int, args, landed_dir: Path | None, log_path: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # the same for every server
    if kind in ("mmkit", "mmkit-noprefix"):
        cmd = [sys.executable, "-m", "mmkit.serve", "--model", str(model_dir), "--port", str(port),
               "--model-name", "bench", "--max-batch-size", str(max(args.levels)), "--queue-size", "64",
               "--max-batch-tokens", "512", "--forward-threads", str(args.forward_threads), "--system", "",
               "--log-level", "warning"] + (["--no-prefix-cache"] if kind == "mmkit-noprefix" else [])
    elif kind == "landed":
        env["PYTHONPATH"] = str(landed_dir)
        cmd = [sys.executable, "-m", "mmkit.serve", "--model", str(model_dir), "--port", str(port),
               "--model-name", "bench", "--concurrency", "4", "--queue-size", "64", "--system", "",
               "--log-level", "warning"]
    else:
        # the `transformers` console script, run by this interpreter
        code = ("import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; "
                "sys.exit(main())")
        cmd = [sys.executable, "-c", code, "serve", str(model_dir), "--port", str(port),
               "--host", "127.0.0.1", "--device", "cpu",
               "--dtype", "float32", "--continuous-batching", "--cb-max-batch-tokens", "512",
               "--log-level", "warning"]
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until it exits
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), cmd


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_ready(proc, base: str, timeout: float = 180) -> None:
    import httpx  # the client side only (--help stays light)

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.3)


async def one_request(http, base: str, body: dict, out: dict) -> None:
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    try:
        async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                out["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    out["errors"].append(f"stream error: {obj['error']}")
                    return
                if obj.get("usage"):
                    tokens = obj["usage"].get("completion_tokens", tokens)
                for ch in obj.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                        chunks += 1
    except Exception as exc:  # noqa: BLE001 - counted and reported
        out["errors"].append(type(exc).__name__)
        return
    if first is None:
        out["errors"].append("no content")
        return
    n = tokens or chunks
    out["ttft"].append(first - t0)
    if n > 1:
        out["tpot"].append((last - first) / (n - 1))
    out["tokens"].append(n)


async def run_level(base: str, model: str, level: int, n_requests: int, max_tokens: int, prompts) -> dict:
    import httpx  # the client side only (--help stays light)

    out = {"ttft": [], "tpot": [], "tokens": [], "errors": []}
    todo = list(range(n_requests))

    async def worker(http):
        while todo:
            k = todo.pop(0)
            text, url = prompts[k % len(prompts)]
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": text}]}]}
            await one_request(http, base, body, out)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=level + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(level)])
        out["wall"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16,32", help="concurrency levels (clients)")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least the level)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--servers", default="mmkit,mmkit-noprefix,transformers,landed",
                    help="mmkit-noprefix: mmkit.serve --no-prefix-cache (every prompt recomputed)")
    ap.add_argument("--landed-rev", default="61a615b", help="git revision of the thread-per-request server")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every server (default: unset, torch's default)")
    ap.add_argument("--forward-threads", type=int, default=1, help="mmkit.serve --forward-threads")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each level per server, interleaved with the other servers' (summed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    servers = args.servers.split(",")

    # benchmarks/common.py, on sys.path from here
    from common import machine_info, print_table

    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = tmp / "llava-tiny"
    meta = write_model(model_dir)
    print(f"threads per server: {args.threads or 'torch default'}")
    print(f"model: llava-hf CLIP(112px, 64 image tokens) + Llama(512 hidden, 6 layers, vocab {meta['vocab']}), "
          f"{meta['params_m']:.1f}M params, fp32 | max({args.requests}, level) requests per level, "
          f"{args.max_tokens} tokens "
          f"each, greedy, streamed, one image per request (4 distinct images)", flush=True)
    landed_dir = None
    if "landed" in servers:
        landed_dir = tmp / "landed"
        landed_dir.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.landed_rev, "mmkit"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(landed_dir)], input=archive, check=True)
    questions = ["what color is the shape ?", "describe the image .", "where is the shape in the picture ?",
                 "what is in the picture ? answer in detail ."]
    prompts = [(questions[k % 4], image_url(k)) for k in range(4)]
    results: dict = {}
    notes = []
    procs: dict = {}
    try:
        # every server runs at once (idle ones wait on a socket) and each level runs them in turn, the order
        # rotated every round: a shared machine's load drifts over minutes, and it should drift onto all alike
        live = {}
        for kind in servers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log_path = tmp / f"{kind}.log"
            proc, cmd = start(kind, model_dir, port, args, landed_dir, log_path)
            procs[kind] = (proc, log_path)
            shown = ["transformers"] + cmd[3:] if kind == "transformers" else ["python"] + cmd[1:]
            print(f"== {kind}: {' '.join(shown)}", flush=True)
            live[kind] = (base, "bench" if kind != "transformers" else str(model_dir))
        for kind in list(live):
            base, model_name = live[kind]
            proc, log_path = procs[kind]
            try:
                wait_ready(proc, base)
                warm = asyncio.run(run_level(base, model_name, 1, 2, 4, prompts))  # loads / warms the model
                if warm["errors"]:
                    raise RuntimeError(f"warm-up failed: {warm['errors'][:2]}")
            except Exception as exc:  # noqa: BLE001 - the server could not serve: say why
                tail = log_path.read_text()[-1500:] if log_path.exists() else ""
                notes.append(f"{kind}: {exc}\n{tail}")
                print(f"   {kind} failed: {exc}\n{tail}", flush=True)
                del live[kind]
        order = list(live)
        for level in args.levels:
            n = max(args.requests, level)
            for rnd in range(args.rounds):
                shift = (rnd + args.levels.index(level)) % max(1, len(order))
                for kind in order[shift:] + order[:shift]:
                    base, model_name = live[kind]
                    cpu0 = cpu_seconds(procs[kind][0].pid)
                    res = asyncio.run(run_level(base, model_name, level, n, args.max_tokens, prompts))
                    res["cpu"] = cpu_seconds(procs[kind][0].pid) - cpu0
                    agg = results.setdefault(kind, {}).setdefault(level, {"ttft": [], "tpot": [], "tokens": [],
                                                                           "errors": [], "wall": 0.0,
                                                                           "cpu": 0.0})
                    for key in ("ttft", "tpot", "tokens", "errors"):
                        agg[key] += res[key]
                    agg["wall"] += res["wall"]
                    agg["cpu"] += res["cpu"]
                    print(f"   {kind} c={level} round {rnd + 1}: {sum(res['tokens']) / res['wall']:.1f} tok/s, "
                          f"{len(res['tokens'])} ok, {len(res['errors'])} errors", flush=True)
    finally:
        for kind, (proc, log_path) in procs.items():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_text = log_path.read_text() if log_path.exists() else ""
            if kind == "transformers" and "does not support continuous batching" in log_text:
                line = next(x for x in log_text.splitlines() if "does not support continuous batching" in x)
                notes.append(f"transformers serve logged: {line.strip()}")
        shutil.rmtree(tmp, ignore_errors=True)

    # tok/CPU-s: generated tokens per CPU-second the server process used (all its threads): what a token
    # costs, whatever share of a contended CPU the server got
    header = ["server", "conc", "gen tok/s", "tok/CPU-s", "req/s", "TTFT p50", "TTFT p99", "tok lat p50",
              "tok lat p99", "errors"]
    rows = []
    for kind in servers:
        for level in args.levels:
            r = results.get(kind, {}).get(level)
            if r is None:
                rows.append([kind, level, "-", "-", "-", "-", "-", "-", "-", "not run"])
                continue
            rows.append([kind, level, f"{sum(r['tokens']) / r['wall']:.1f}", f"{len(r['tokens']) / r['wall']:.2f}",
                         f"{percentile(r['ttft'], 50) * 1e3:.0f} ms", f"{percentile(r['ttft'], 99) * 1e3:.0f} ms",
                         f"{percentile(r['tpot'], 50) * 1e3:.1f} ms", f"{percentile(r['tpot'], 99) * 1e3:.1f} ms",
                         str(len(r["errors"]))])
            rows[-1].insert(3, f"{sum(r['tokens']) / r['cpu']:.1f}" if r["cpu"] > 0 else "-")
    print()
    print_table(header, rows)
    ratios = []
    for level in args.levels:
        m = results.get("mmkit", {}).get(level)
        if m is None:
            continue
        for peer in ("transformers", "landed", "mmkit-noprefix"):
            p = results.get(peer, {}).get(level)
            if p is not None and sum(p["tokens"]):
                ratio = (sum(m["tokens"]) / m["wall"]) / (sum(p["tokens"]) / p["wall"])
                ttft = percentile(m["ttft"], 99) / percentile(p["ttft"], 99)
                eff = (sum(m["tokens"]) / m["cpu"]) / (sum(p["tokens"]) / p["cpu"]) if m["cpu"] > 0 and p["cpu"] > 0 \
                    else float("nan")
                ratios.append(f"c={level}: mmkit / {peer} generated tok/s {ratio:.2f}x, TTFT p99 {ttft:.2f}x, "
                              f"tokens per CPU-second {eff:.2f}x")
    if ratios:
        print("\n" + "\n".join(ratios))
    for note in notes:
        print("\nnote: " + note)
    errors = {k: [e for r in v.values() for e in r["errors"]] for k, v in results.items()}
    for kind, errs in errors.items():
        if errs:
            print(f"\n{kind} errors (first 3): {errs[:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": {
            k: {str(lv): {"tok_s": sum(r["tokens"]) / r["wall"], "req_s": len(r["tokens"]) / r["wall"],
                          "ttft_p50": percentile(r["ttft"], 50), "ttft_p99": percentile(r["ttft"], 99),
                          "tpot_p50": percentile(r["tpot"], 50), "tpot_p99": percentile(r["tpot"], 99),
                          "errors": len(r["errors"]), "cpu_s": r["cpu"]} for lv, r in v.items()} for k, v in results.items()}},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
