"""mmkit image preprocessing vs transformers' LLaVA-NeXT image processors, side by side in one process.

    python benchmarks/bench_preprocess.py [--images 8] [--rounds 9] [--size 640x480]

Pairs (LLaVA-1.6 pinpoints, CLIP-336 tiles, one image per call as a data loader does):
  * mmkit ``backend="pil"``  vs ``LlavaNextImageProcessorPil``  (PIL/numpy backend); also shown with
    ``parallel_resize=False`` (no helper thread for the base-view resize)
  * mmkit ``backend="fast"`` vs ``LlavaNextImageProcessor``     (transformers' default torchvision backend)
Rounds interleave the contenders (rotating the order each round) over the same synthetic photos (smooth gradients +
noise). Reports images/s median and [min, max] over rounds by wall clock and by process CPU time (the latter counts
every thread, so it is fair to the helper thread and to torch's intra-op threads, and is less sensitive to other
load on a shared machine), and the ratio of medians together with the median of the per-round ratios. Outputs are
checked for equality with their twin before timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import os
import statistics
import sys
import time

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image
from transformers import LlavaNextImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from mmkit.processing.anyres import LLAVA_NEXT_PINPOINTS
from mmkit.processing.image import ImageProcessor


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, ph = rng.uniform(20, 80), rng.uniform(15, 60), rng.uniform(0, 6.28)
    img = np.stack(
        [
            128 + 100 * np.sin(x / fx + ph),
            128 + 100 * np.cos(y / fy - ph),
            128 + 80 * np.sin((x + y) / (fx + fy)),
        ],
        axis=-1,
    )
    img += rng.normal(0, 18, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--size", default="640x480", help="WxH of the synthetic photos")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))

    print("== machine ==")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info

    machine_info()
    print(f"torch cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    print(
        f"python {sys.version.split()[0]} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
        f"transformers {transformers.__version__} | pillow {PIL.__version__} | numpy {np.__version__}"
    )

    images = [synthetic_photo(w, h, seed) for seed in range(args.images)]
    hf_kw = dict(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    )
    contenders = {
        "mmkit pil": (lambda p: (lambda im: p([im])["pixel_values"][0]))(ImageProcessor.llava_next(backend="pil")),
        "mmkit pil, no helper thread": (lambda p: (lambda im: p([im])["pixel_values"][0]))(
            ImageProcessor.llava_next(backend="pil", parallel_resize=False)
        ),
        "hf LlavaNextImageProcessorPil": (lambda p: (lambda im: p(im, return_tensors="pt")["pixel_values"][0]))(
            LlavaNextImageProcessorPil(**hf_kw)
        ),
        "mmkit fast": (lambda p: (lambda im: p([im])["pixel_values"][0]))(ImageProcessor.llava_next(backend="fast")),
        "hf LlavaNextImageProcessor": (lambda p: (lambda im: p(im, return_tensors="pt")["pixel_values"][0]))(
            LlavaNextImageProcessor(**hf_kw)
        ),
    }
    pairs = [
        ("mmkit pil", "hf LlavaNextImageProcessorPil"),
        ("mmkit pil, no helper thread", "hf LlavaNextImageProcessorPil"),
        ("mmkit fast", "hf LlavaNextImageProcessor"),
    ]

    print(f"\n== parity ({len(images)} images {w}x{h}) ==")
    for mine, ref in pairs:
        diff = max((contenders[mine](im) - contenders[ref](im)).abs().max().item() for im in images)
        shape = tuple(contenders[mine](images[0]).shape)
        print(f"{mine:28s} vs {ref:30s} pixel_values {shape} max abs diff {diff:.3g}")

    names = list(contenders)
    for name in names:  # warm-up
        for im in images[:2]:
            contenders[name](im)
    rates: dict[str, list[float]] = {n: [] for n in names}  # wall clock
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}  # process CPU time (all threads)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = contenders[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for im in images:
                fn(im)
            t1, c1 = time.perf_counter(), time.process_time()
            rates[name].append(len(images) / (t1 - t0))
            cpu_rates[name].append(len(images) / max(c1 - c0, 1e-9))

    print(f"\n== throughput ({args.rounds} interleaved rounds x {len(images)} images) ==")
    print(f"{'':32s} {'wall images/s: median [min, max]':38s} CPU images/s (per CPU-second, all threads)")
    for name in names:
        v, c = rates[name], cpu_rates[name]
        print(
            f"{name:32s} {statistics.median(v):8.1f} [{min(v):7.1f}, {max(v):7.1f}]          "
            f"{statistics.median(c):8.1f} [{min(c):7.1f}, {max(c):7.1f}]"
        )
    for label, table in (("wall clock", rates), ("CPU time", cpu_rates)):
        print(f"\n== ratios, {label} (mmkit / transformers) ==")
        for mine, ref in pairs:
            ratio_of_medians = statistics.median(table[mine]) / statistics.median(table[ref])
            per_round = [a / b for a, b in zip(table[mine], table[ref])]
            print(
                f"{mine:28s} / {ref:30s} {ratio_of_medians:5.2f}x   (per-round median "
                f"{statistics.median(per_round):.2f}x, range {min(per_round):.2f}-{max(per_round):.2f})"
            )
    try:
        print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
