"""Shared by the benchmarks: what machine this is, and a plain-text table."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_isa() -> dict:
    """The vector instructions torch's CPU kernels use here, and the related /proc/cpuinfo flags."""
    import torch

    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in wanted if f in flags]}


def machine_info() -> dict:
    """CPU model, cores, load, torch threads, versions and GPU (printed with every result)."""
    cpu = platform.processor() or "?"
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable ({type(e).__name__})"
    import transformers

    info = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "cpu_isa": cpu_isa(),
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if info["cuda"] is None:
        print("triton: not measured (no GPU)")
    return info


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
