"""Indexing a large mixture: LLaVA JSON vs Arrow vs WebDataset shards, memory and time to the first batch.

    python benchmarks/bench_data_index.py [--records 2000000] [--cache DIR] [--json OUT]

Data: ``--records`` text-only LLaVA records generated here (seeded; 1-3 exchanges of 4-12 word questions and
1-20 word answers over the demo's vocabulary, so every word is a token), written once as a JSON list and
converted from it with ``python -m mmkit.data.convert`` to Arrow (``--to arrow``) and to shards
(``--to webdataset``), both with the default ``--shard-size 1GB``. The three are cached under ``--cache``
(default: the temp directory) and reused; the generation time is printed when they are made.

Measured, each kind in a fresh subprocess (so no kind sees another's memory or page cache of Python objects):
the training path of ``python -m mmkit.train`` for one source of that kind -- ``build_dataset`` (the recipe's
``data.sources``), ``StepBatchSampler`` (global batch 64, one process) and ``build_loader`` with no worker --
then ``next()`` on the loader. Reported: the process's RSS after indexing (``VmRSS``; the imports -- torch,
transformers, mmkit -- are ~540 MiB of it in every kind), how much of it is file-backed (``RssFile``: pages of
memory-mapped files, i.e. the page cache, shared by every process that maps the same files and dropped by the
kernel under pressure; once pyarrow has opened a memory-mapped Arrow file its pages are resident), the growth of private memory over indexing (``RssAnon`` after minus before: what the process itself
holds for the data), the peak RSS (``VmHWM``), the time to index and the time from the start of indexing to the
first collated batch; ratios against the JSON path of the same run.
The kinds run one after another, ``--rounds`` times, in rotating order; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("json", "arrow", "webdataset")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate(cache: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """The three copies of the mixture under ``cache`` (made once)."""
    from mmkit.demo import shapes  # the demo's words: every one is a token of its tokenizer

    paths = {"json": cache / "data.json", "arrow": cache / "arrow", "webdataset": cache / "shards"}
    if all(p.exists() for p in paths.values()):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    words = sorted(shapes.vocabulary())
    rng = random.Random(seed)
    t0 = time.perf_counter()
    if not paths["json"].exists():
        tmp = paths["json"].with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("[\n")
            for i in range(n):
                conv = []
                for _ in range(rng.randint(1, 3)):
                    conv.append({"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(4, 12)))})
                    conv.append({"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(1, 20)))})
                f.write(json.dumps({"id": f"r{i:08d}", "conversations": conv}))
                f.write(",\n" if i < n - 1 else "\n]\n")
        os.replace(tmp, paths["json"])
    print(f"generated {n:,} records as JSON in {time.perf_counter() - t0:.0f} s", flush=True)
    for kind, to in (("arrow", "arrow"), ("webdataset", "webdataset")):
        if paths[kind].exists():
            continue
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmkit.data.convert", str(paths["json"]), "--to", to,
                        str(paths[kind])], check=True, cwd=ROOT)
        print(f"converted to {kind} in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"generation total: {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def child(kind: str, path: str) -> None:
    """One measurement (runs in a fresh process): prints one JSON line."""
    from mmkit.data.collate import Collator
    from mmkit.data.dataset import build_dataset
    from mmkit.data.loader import build_loader
    from mmkit.data.sampler import StepBatchSampler
    from mmkit.demo.tokenizer import shapes_tokenizer
    from mmkit.processing.image import ImageProcessor
    from mmkit.processing.processor import MultimodalProcessor
    from mmkit.recipe import DataConfig, DataSource

    tok = shapes_tokenizer()
    processor = MultimodalProcessor(tok, ImageProcessor.clip(32, aspect_ratio="square"), "vicuna_v1", "<image>",
                                    tok.convert_tokens_to_ids("<image>"), 16, 4, max_length=256)
    before, before_anon = _status_kib("VmRSS"), _status_kib("RssAnon")
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(sources=[DataSource(path=path)]), processor, "vicuna_v1", max_length=256, seed=0)
    sampler = StepBatchSampler(len(ds), 64, 64, seed=0)
    loader = build_loader(ds, sampler, Collator(processor), num_workers=0)
    t_index = time.perf_counter() - t0
    after, after_anon, after_file = _status_kib("VmRSS"), _status_kib("RssAnon"), _status_kib("RssFile")
    batch = next(iter(loader))
    t_first = time.perf_counter() - t0
    print(json.dumps({"kind": kind, "samples": len(ds), "rss_before_kib": before, "rss_after_index_kib": after,
                      "anon_before_kib": before_anon, "anon_after_index_kib": after_anon, "file_after_index_kib":
                      after_file,
                      "peak_kib": _status_kib("VmHWM"), "index_s": t_index, "first_batch_s": t_first,
                      "batch_samples": batch["num_samples"]}))


def measure(kind: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--cache", type=Path, default=None, help="where the generated data is kept (default: tmp)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    from benchmarks.common import machine_info, print_table

    import torch

    info = machine_info()
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0].split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    print(f"cpu ISA: torch CPU capability {torch.backends.cpu.get_cpu_capability()}; flags {' '.join(isa)}")
    cache = args.cache or Path(tempfile.gettempdir()) / f"mmkit-bench-data-index-{args.records}"
    paths = generate(cache, args.records)
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        order = KINDS[r % 3:] + KINDS[:r % 3]
        for kind in order:
            runs[kind].append(measure(kind, paths[kind]))
            print(f"round {r + 1} {kind}: {runs[kind][-1]}", flush=True)

    def med(kind, key):
        return statistics.median(x[key] for x in runs[kind])

    ref = {key: med("json", key) for key in ("rss_after_index_kib", "anon_before_kib", "anon_after_index_kib",
                                              "first_batch_s")}
    ref_growth = ref["anon_after_index_kib"] - ref["anon_before_kib"]
    rows, out = [], {"machine": info, "records": args.records, "rounds": args.rounds, "results": {}}
    for kind in KINDS:
        after = med(kind, "rss_after_index_kib")
        growth = med(kind, "anon_after_index_kib") - med(kind, "anon_before_kib")
        res = {"samples": runs[kind][0]["samples"], "disk_bytes": _du(paths[kind]),
               "rss_after_index_mib": after / 1024, "file_backed_mib": med(kind, "file_after_index_kib") / 1024,
               "private_growth_mib": growth / 1024, "peak_mib": med(kind, "peak_kib") / 1024,
               "index_s": med(kind, "index_s"), "first_batch_s": med(kind, "first_batch_s"),
               "rss_ratio": after / ref["rss_after_index_kib"], "private_growth_ratio": growth / ref_growth,
               "first_batch_ratio": med(kind, "first_batch_s") / ref["first_batch_s"]}
        out["results"][kind] = res
        rows.append([kind, f"{res['samples']:,}", f"{res['disk_bytes'] / 2**20:.0f} MiB",
                     f"{res['rss_after_index_mib']:.0f} MiB", f"{res['file_backed_mib']:.0f} MiB",
                     f"{res['private_growth_mib']:.0f} MiB", f"{res['peak_mib']:.0f} MiB",
                     f"{res['index_s']:.2f} s", f"{res['first_batch_s']:.2f} s", f"{res['rss_ratio']:.3f}x",
                     f"{res['private_growth_ratio']:.4f}x", f"{res['first_batch_ratio']:.4f}x"])
    print()
    print_table(["kind", "samples", "on disk", "RSS after indexing", "of it file-backed", "private growth",
                 "peak RSS", "index", "first batch", "RSS vs JSON", "private growth vs JSON",
                 "first batch vs JSON"], rows)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
