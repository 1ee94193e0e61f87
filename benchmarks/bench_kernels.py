"""Benchmark mmkit's kernels against the usual torch ways of doing the same thing.

    python benchmarks/bench_kernels.py [--quick] [--json OUT] [--repeats N] [--no-compile]

On CPU only torch paths are timed (the Triton interpreter is 1,000x+ slower than torch and says
nothing about kernel speed): ``triton: not measured (no GPU)``. With CUDA, the Triton paths are
timed too, with ``triton.testing.do_bench``.

* merge: mmkit's merge (torch path: embedding + sync-free ``index_copy_``) vs Hugging Face's
  ``masked_scatter`` with a [T, H] mask vs ``nonzero`` + ``index_copy_``.
* projector (mlp2x_gelu, fwd+bwd): mmkit ``project`` vs an eager ``nn.Sequential`` vs
  ``torch.compile`` of it (compile failures are caught and reported).
* LM-head loss (fwd+bwd): mmkit FLCE vs eager full logits + ``F.cross_entropy`` (HF style) vs
  eager on the supervised rows only (separates the row selection from the chunking).

Timing: ``time.perf_counter`` around one call, providers interleaved (rotated order each
repeat, after warmup), reported as median and min..max over repeats. Peak memory (merge and
LM-head loss): each provider runs in a fresh child process with large allocations forced to
mmap (``MALLOC_MMAP_THRESHOLD_``, so freed memory leaves RSS); after the inputs are built and one
warmup call, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5) and the
reported number is ``VmHWM - VmRSS`` around one more call: the op's peak *extra* resident memory
(outputs and gradients included, inputs excluded), on Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mmkit_kernels import dispatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from mmkit_kernels.flce import fused_linear_cross_entropy  # noqa: E402
from mmkit_kernels.merge import merge_image_features  # noqa: E402
from mmkit_kernels.projector import project  # noqa: E402

IMG = 32000 - 1  # image placeholder id used by the merge cases (inside every vocab used)

# --------------------------------------------------------------------------------------------
# sizes

FULL = {
    "merge": [dict(T=4096, H=4096, n_img=576, V=32000), dict(T=16384, H=4096, n_img=2304, V=32000)],
    "projector": [dict(M=576, K=1024, N1=4096, N2=4096)],
    # CPU-sized: N=1024 x H=1024 (eager at V=152k is ~1 TFLOP per fwd+bwd, seconds per call here)
    "flce": [dict(N=1024, H=1024, V=32000, sup=0.4), dict(N=1024, H=1024, V=152064, sup=0.4)],
}
QUICK = {
    "merge": [dict(T=1024, H=1024, n_img=144, V=32000), dict(T=4096, H=1024, n_img=576, V=32000)],
    "projector": [dict(M=576, K=256, N1=1024, N2=1024)],
    "flce": [dict(N=512, H=256, V=32000, sup=0.4), dict(N=512, H=256, V=152064, sup=0.4)],
}
DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------
# machine info


# --------------------------------------------------------------------------------------------
# the cases: each returns {provider: zero-arg callable} over freshly built inputs


def _merge_inputs(T, H, n_img, V, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 1, (T,), generator=g)
    # images as contiguous 576-token blocks (or one block) at random offsets, like LLaVA prompts
    block = min(576, n_img)
    starts = torch.randperm(T // block, generator=g)[: n_img // block] * block
    for s in starts.tolist():
        ids[s : s + block] = IMG
    ids = ids.to(device)
    table = torch.randn(V, H, generator=g).to(device, DTYPE)
    feats = torch.randn(int((ids == IMG).sum()), H, generator=g).to(device, DTYPE)
    return ids, table, feats


def merge_case(T, H, n_img, V, device="cpu"):
    ids, table, feats = _merge_inputs(T, H, n_img, V, device)

    def mmkit():
        return merge_image_features(ids, table, feats, IMG, check=False)

    def hf_masked_scatter():
        emb = F.embedding(torch.where(ids == IMG, 0, ids), table)
        mask = (ids == IMG).unsqueeze(-1).expand_as(emb)
        return emb.masked_scatter(mask, feats)

    def index_copy():
        is_img = ids == IMG
        emb = F.embedding(torch.where(is_img, 0, ids), table)
        return emb.index_copy_(0, is_img.nonzero().squeeze(1), feats)

    return {"mmkit": mmkit, "masked_scatter": hf_masked_scatter, "index_copy_": index_copy}


def projector_case(M, K, N1, N2, device="cpu", compile_=True):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(K, N1), nn.GELU(), nn.Linear(N1, N2)).to(device, DTYPE)
    x = torch.randn(M, K, device=device, dtype=DTYPE, requires_grad=True)
    params = [x, *seq.parameters()]
    gy = torch.randn(M, N2, device=device, dtype=DTYPE)
    l1, l2 = seq[0], seq[2]

    def fwd_bwd(fn):
        def run():
            y = fn()
            return torch.autograd.grad(y, params, gy)

        return run

    providers = {
        "mmkit": fwd_bwd(lambda: project(x, l1.weight, l1.bias, l2.weight, l2.bias)),
        "eager": fwd_bwd(lambda: seq(x)),
    }
    notes = {}
    if compile_:
        try:
            compiled = torch.compile(seq)
            t0 = time.perf_counter()
            torch.autograd.grad(compiled(x), params, gy)  # compile fwd + bwd now
            notes["compile_s"] = round(time.perf_counter() - t0, 1)
            providers["torch.compile"] = fwd_bwd(lambda: compiled(x))
        except Exception as e:  # noqa: BLE001
            notes["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return providers, notes


def _flce_inputs(N, H, V, sup, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, H, generator=g)).to(device, DTYPE).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device, DTYPE).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) >= sup] = -100  # LLaVA: image tokens and prompts are unsupervised
    return h, w, y.to(device)


def flce_case(N, H, V, sup, device="cpu"):
    h, w, y = _flce_inputs(N, H, V, sup, device)

    def mmkit():
        return torch.autograd.grad(fused_linear_cross_entropy(h, w, y), [h, w])

    def eager():  # HF style: all logits, upcast, CE with ignore_index
        return torch.autograd.grad(F.cross_entropy((h @ w.T).float(), y), [h, w])

    def eager_selected():
        keep = y != -100
        return torch.autograd.grad(F.cross_entropy((h[keep] @ w.T).float(), y[keep]), [h, w])

    return {"mmkit": mmkit, "eager": eager, "eager_selected": eager_selected}


# --------------------------------------------------------------------------------------------
# timing and memory


def time_interleaved(providers: dict, warmup: int, repeats: int) -> dict:
    names = list(providers)
    for _ in range(warmup):
        for n in names:
            providers[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            providers[n]()
            times[n].append(time.perf_counter() - t0)
    return {
        n: {"median_ms": round(statistics.median(t) * 1e3, 2), "min_ms": round(min(t) * 1e3, 2),
            "max_ms": round(max(t) * 1e3, 2), "repeats": len(t)}
        for n, t in times.items()
    }


def _status_bytes(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024


def _mem_child(spec: dict) -> dict:
    """Runs in a fresh process: peak extra RSS of one call (see module docstring)."""
    torch.set_num_threads(spec["threads"])
    build = {"merge": merge_case, "flce": flce_case}[spec["op"]]
    fn = build(**spec["size"])[spec["provider"]]
    out = fn()  # warmup (lazy init of thread pools / oneDNN)
    del out
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status_bytes("VmRSS")
    out = fn()
    peak = _status_bytes("VmHWM")
    return {"peak_extra_mib": round((peak - rss0) / 2**20, 1)}


def peak_memory(op: str, provider: str, size: dict) -> dict:
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_extra_mib": None, "error": "needs Linux /proc"}
    spec = {"op": op, "provider": provider, "size": size, "threads": torch.get_num_threads()}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MMKIT_KERNELS="torch")
    proc = subprocess.run([sys.executable, __file__, "--_mem", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"peak_extra_mib": None, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def triton_gpu_times(op: str, size: dict) -> dict:
    """CUDA only: the Triton path (MMKIT_KERNELS=triton) vs the torch path, with do_bench."""
    import triton.testing

    out = {}
    for mode in ("triton", "torch"):
        dispatch.set_kernel_mode(mode)
        if op == "merge":
            fn = merge_case(**size, device="cuda")["mmkit"]
        elif op == "projector":
            fn = projector_case(**size, device="cuda", compile_=False)[0]["mmkit"]
        else:
            fn = flce_case(**size, device="cuda")["mmkit"]
        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        out[f"mmkit-{mode}"] = {"median_ms": round(ms[0], 3), "p20_ms": round(ms[1], 3), "p80_ms": round(ms[2], 3),
                                "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    dispatch.set_kernel_mode(None)
    return out


# --------------------------------------------------------------------------------------------


def _fmt_size(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _print_times(times: dict, mem: dict | None = None) -> None:
    base = times.get("mmkit", {}).get("median_ms")
    for n, t in times.items():
        ratio = f"  x{t['median_ms'] / base:.2f} vs mmkit" if base and n != "mmkit" else ""
        m = ""
        if mem and n in mem:
            v = mem[n].get("peak_extra_mib")
            m = f"  peak +{v} MiB" if v is not None else f"  peak ? ({mem[n].get('error')})"
        print(f"    {n:16s} {t['median_ms']:10.2f} ms  [{t['min_ms']:.2f}..{t['max_ms']:.2f}]{ratio}{m}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds, for a smoke run)")
    ap.add_argument("--json", metavar="OUT", help="write all results as JSON")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per provider")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in the projector case")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--only", choices=["merge", "projector", "flce"], action="append")
    ap.add_argument("--_mem", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mem:
        print(json.dumps(_mem_child(json.loads(args._mem))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dispatch.set_kernel_mode("torch" if not torch.cuda.is_available() else None)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (7 if args.quick else 3)
    ops = args.only or ["merge", "projector", "flce"]

    info = machine_info()
    print(f"dtype={str(DTYPE).replace('torch.', '')} device=cpu repeats={repeats} warmup={args.warmup}"
          f" sizes={'quick' if args.quick else 'full'}")
    print("timing: perf_counter per call, providers interleaved; median [min..max] ms")
    print("memory: peak extra RSS of one call in a fresh process (VmHWM after clear_refs, inputs excluded)")
    gpu = torch.cuda.is_available()
    if not gpu:
        print("triton: not measured (no GPU)")
    results = {"machine": info, "dtype": str(DTYPE), "quick": args.quick, "repeats": repeats, "cases": []}
    t_start = time.perf_counter()

    for op in ops:
        for size in sizes[op]:
            print(f"\n[{op}] {_fmt_size(size)}", flush=True)
            notes = {}
            if op == "merge":
                providers = merge_case(**size)
            elif op == "projector":
                providers, notes = projector_case(**size, compile_=not args.no_compile)
                if "compile_error" in notes:
                    print(f"    torch.compile failed: {notes['compile_error']}")
                elif "compile_s" in notes:
                    print(f"    torch.compile first call (compile) took {notes['compile_s']} s")
            else:
                providers = flce_case(**size)
            times = time_interleaved(providers, args.warmup, repeats)
            del providers
            gc.collect()
            mem = None
            if op in ("merge", "flce") and not args.no_memory:
                mem = {p: peak_memory(op, p, size) for p in times}
            _print_times(times, mem)
            case = {"op": op, "size": size, "times": times, "memory": mem, "notes": notes,
                    "mmkit_path": dispatch.last_path({"merge": "merge", "projector": "projector", "flce": "flce"}[op])}
            if op == "flce":
                logits = size["N"] * size["V"]
                case["logits_mib"] = {"bf16": round(logits * 2 / 2**20, 1), "fp32": round(logits * 4 / 2**20, 1)}
                print(f"    (full logits would be {case['logits_mib']['bf16']} MiB bf16 + "
                      f"{case['logits_mib']['fp32']} MiB fp32 upcast)")
            if gpu:
                try:
                    case["gpu"] = triton_gpu_times(op, size)
                    for n, t in case["gpu"].items():
                        print(f"    cuda {n:12s} {t['median_ms']:.3f} ms [{t['p20_ms']}..{t['p80_ms']}] "
                              f"peak {t['peak_mib']} MiB")
                except Exception as e:  # noqa: BLE001
                    case["gpu"] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"    cuda: failed: {case['gpu']['error']}")
            results["cases"].append(case)

    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\nelapsed {results['elapsed_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
