"""Choose between the Triton kernels and their torch references.

``MMKIT_KERNELS`` (or a recipe's ``model.kernels``) is ``auto`` (Triton on CUDA tensors,
torch elsewhere), ``triton`` (Triton wherever it can run: CUDA, or the CPU interpreter when
``TRITON_INTERPRET=1``) or ``torch``. ``last_path(op)`` says which path an op last took, so
the run log can state it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("mmkit.kernels")

MODES = ("auto", "triton", "torch")
_mode: str | None = None
_last: dict[str, str] = {}


def set_kernel_mode(mode: str | None) -> None:
    """Override ``MMKIT_KERNELS`` for this process (None = read the environment again)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def kernel_mode() -> str:
    mode = _mode or os.environ.get("MMKIT_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MMKIT_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should take the Triton path."""
    mode = kernel_mode()
    if mode == "torch" or not triton_available():
        return False
    if t.is_cuda:
        return True
    return mode == "triton" and interpreter()


def record(op: str, path: str) -> None:
    if _last.get(op) != path:
        log.info("kernel %s: %s path", op, path)
    _last[op] = path


def last_path(op: str) -> str | None:
    return _last.get(op)
