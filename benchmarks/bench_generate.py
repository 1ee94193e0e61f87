"""mmkit's decoding loop vs transformers' ``LlavaForConditionalGeneration.generate`` on identical weights.

    python benchmarks/bench_generate.py [--repeats 7] [--new-tokens 64] [--batch 1]

A small random llava-hf model (CLIP + Llama) is written by transformers ``save_pretrained`` and
loaded by ``mmkit.load``; both generate greedily from the same prompt (an image + text) for the
same number of tokens (eos disabled). The outputs must be token-identical (asserted). Reported
per side, as the median over interleaved repeats (the order alternates each repeat): time to first
token (vision + prefill + first step) and decode tokens/s (tokens after the first). The ratio is
measured in this one run, on this machine (printed); CPU timings say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def build_model(path: Path, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=112, patch_size=14),
        text_config=LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=4, vocab_size=4000, max_position_embeddings=2048,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=3999, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(path)
    return hf


class _Times:
    """A transformers streamer that records when each put() happens (the first put is the prompt)."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def run_hf(hf, inputs, new_tokens):
    times = _Times()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=times if inputs["input_ids"].shape[0] == 1
                          else None)
    t_end = time.perf_counter()
    ids = out[:, inputs["input_ids"].shape[1]:]
    first = times.t[1] if len(times.t) > 1 else None
    return ids, t0, first, t_end


def run_mmkit(model, inputs, new_tokens):
    from mmkit.infer.generate import _Run

    t0 = time.perf_counter()
    with torch.no_grad():
        run = _Run(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], None,
                   max_new_tokens=new_tokens, ignore_eos=True)
        first = None
        for _ in run.steps_iter():
            if first is None:
                first = time.perf_counter()
    t_end = time.perf_counter()
    return run.result().sequences, t0, first, t_end


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=48, help="text tokens around the image")
    ap.add_argument("--batch", type=int, default=1, help="batch size (>1: left-padded rows; TTFT not measured)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    import mmkit

    hf_logging.set_verbosity_error()
    machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_model(Path(tmp))
        ours = mmkit.load(tmp).eval()
    n_img = (112 // 14) ** 2
    g = torch.Generator().manual_seed(0)
    rows, lengths = [], []
    for b in range(args.batch):
        n_text = args.prompt_tokens - 4 * b
        text = torch.randint(10, 3900, (n_text,), generator=g).tolist()
        rows.append([1] + text[: n_text // 2] + [3999] * n_img + text[n_text // 2:])
        lengths.append(len(rows[-1]))
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(args.batch, 3, 112, 112, generator=g)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    print(f"model: llava-hf CLIP(112px, 64 image tokens) + Llama(512 hidden, 6 layers, vocab 4000), {params:.1f}M "
          f"params, fp32 | batch {args.batch}, prompt {width} tokens, {args.new_tokens} new tokens greedy, "
          f"{args.repeats} interleaved repeats")

    # warm-up (also the identity check)
    ref, *_ = run_hf(hf, inputs, args.new_tokens)
    got, *_ = run_mmkit(ours, inputs, args.new_tokens)
    assert torch.equal(ref, got), f"outputs differ:\nhf    {ref.tolist()}\nmmkit {got.tolist()}"

    stats = {"transformers": {"ttft": [], "decode": [], "total": []}, "mmkit": {"ttft": [], "decode": [], "total": []}}
    runners = {"transformers": lambda: run_hf(hf, inputs, args.new_tokens),
               "mmkit": lambda: run_mmkit(ours, inputs, args.new_tokens)}
    for r in range(args.repeats):
        order = ["transformers", "mmkit"] if r % 2 == 0 else ["mmkit", "transformers"]
        outs = {}
        for name in order:
            seq, t0, first, t_end = runners[name]()
            outs[name] = seq
            st = stats[name]
            st["total"].append(t_end - t0)
            if first is not None:
                st["ttft"].append(first - t0)
                st["decode"].append((args.new_tokens - 1) * args.batch / (t_end - first))
        assert torch.equal(outs["transformers"], outs["mmkit"]), "outputs differ"
    print("outputs identical: yes (all repeats)")
    med = {k: {m: statistics.median(v) if v else float("nan") for m, v in d.items()} for k, d in stats.items()}
    hf_m, mk = med["transformers"], med["mmkit"]
    if args.batch > 1:  # transformers' streamers take batch 1 only: total time per batch
        for name in ("transformers", "mmkit"):
            total = med[name]["total"]
            print(f"{name:14s} total {total * 1e3:8.1f} ms  ({args.batch * args.new_tokens / total:.1f} tok/s)")
        print(f"ratio mmkit/transformers: total time {mk['total'] / hf_m['total']:.2f}x (lower is better)")
        return 0
    print(f"{'':14s}{'TTFT ms':>10s}{'decode tok/s':>14s}{'total ms':>10s}")
    for name in ("transformers", "mmkit"):
        m = med[name]
        print(f"{name:14s}{m['ttft'] * 1e3:10.1f}{m['decode']:14.1f}{m['total'] * 1e3:10.1f}")
    print(f"ratio mmkit/transformers: TTFT {mk['ttft'] / hf_m['ttft']:.2f}x (lower is better), decode "
          f"{mk['decode'] / hf_m['decode']:.2f}x (higher is better), total {mk['total'] / hf_m['total']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
