"""Training step: mmkit vs transformers' LlavaForConditionalGeneration on identical weights.

A ~50M-parameter Llava (CLIP tower, Llama text model, vocab 32000) is written by transformers and
loaded by mmkit, so both sides hold the same weights. Each step is forward + backward + AdamW on a
batch of 2 x 1024 tokens: 256 image tokens, a masked prompt, and a supervised answer (the LLaVA
layout: most positions carry label -100). Time is measured interleaved in one process (median
and spread over repeats); peak memory is the growth of peak RSS over two steps (after loading), one fresh process per side and dtype.

    python benchmarks/bench_train_step.py [--repeats 5] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table  # noqa: E402

IMAGE_TOKEN = 31999


def build_hf(path: Path, quick: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=14)
    text = LlamaConfig(hidden_size=256 if quick else 512, intermediate_size=688 if quick else 1376,
                       num_hidden_layers=2 if quick else 4, num_attention_heads=8, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=2048)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=IMAGE_TOKEN))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def batch(seq: int, answer: int = 200):
    g = torch.Generator().manual_seed(1)
    n_img = 256
    ids = torch.randint(2, 31000, (2, seq), generator=g)
    ids[:, 1:1 + n_img] = IMAGE_TOKEN
    labels = ids.clone()
    labels[:, : seq - answer] = -100  # image, system and question masked; the answer supervised
    pixels = torch.randn(2, 3, 224, 224, generator=g)
    return ids, labels, pixels


def load(side: str, path: Path):
    if side == "transformers":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path).train()
    import mmkit

    return mmkit.load(path).train()


def step_fn(side: str, model, seq: int, bf16: bool):
    ids, labels, pixels = batch(seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if side == "transformers":
                loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
            else:
                loss = model(input_ids=ids, pixel_values=pixels, labels=labels, return_logits=False).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_step_memory(side: str, path: str, seq: int, bf16: bool) -> float:
    """In this process: peak RSS growth (MiB) over two steps, from the RSS after loading (Linux VmHWM reset)."""
    model = load(side, Path(path))
    step = step_fn(side, model, seq, bf16)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    base = _status_kib("VmRSS")
    step()
    step()
    return (_status_kib("VmHWM") - base) / 1024


def peak_rss_child(side: str, path: Path, seq: int, bf16: bool) -> float:
    """Peak RSS growth (MiB) of two training steps, measured in a fresh process per side."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
            f"import bench_train_step as b;"
            f"print(b.measure_step_memory({side!r}, {str(path)!r}, {seq}, {bf16}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="a smaller model and sequence, for a smoke run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    seq = 512 if args.quick else args.seq
    info = machine_info()
    rows, results = [], {"machine": info, "seq": seq, "batch": 2, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llava"
        n_params = build_hf(path, args.quick)
        results["params"] = n_params
        print(f"model: {n_params / 1e6:.1f}M parameters, batch 2 x {seq} tokens, vocab 32000")
        for bf16 in (False, True):
            models = {side: load(side, path) for side in ("transformers", "mmkit")}
            steps = {side: step_fn(side, m, seq, bf16) for side, m in models.items()}
            losses = {side: s() for side, s in steps.items()}  # warm-up, and the losses to compare
            times = {side: [] for side in steps}
            for _ in range(args.repeats):
                for side, s in steps.items():  # interleaved
                    t0 = time.perf_counter()
                    s()
                    times[side].append(time.perf_counter() - t0)
            mem = {side: peak_rss_child(side, path, seq, bf16) for side in steps}
            med = {side: statistics.median(t) for side, t in times.items()}
            spread = {side: (min(t), max(t)) for side, t in times.items()}
            case = {
                "dtype": "bf16 autocast" if bf16 else "fp32",
                "step_s": med, "spread_s": spread, "peak_rss_mib": mem, "first_loss": losses,
                "throughput_ratio": med["transformers"] / med["mmkit"],
                "memory_ratio": mem["mmkit"] / mem["transformers"],
            }
            results["cases"].append(case)
            rows.append([case["dtype"], f"{med['transformers']:.2f}", f"{med['mmkit']:.2f}",
                         f"{case['throughput_ratio']:.2f}x", f"{mem['transformers']:.0f}", f"{mem['mmkit']:.0f}",
                         f"{case['memory_ratio']:.2f}x", f"{losses['transformers']:.5f} / {losses['mmkit']:.5f}"])
            del models, steps
    print_table(["dtype", "HF step s", "mmkit step s", "throughput", "HF peak MiB", "mmkit peak MiB", "memory",
                 "loss HF / mmkit"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
