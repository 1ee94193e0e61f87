"""Shared Triton plumbing for mmkit's kernels (imported only when Triton is importable).

``lazy_jit`` defers ``triton.jit`` to the first launch and caches one kernel object per
interpreter mode. Triton picks compiler or CPU interpreter when ``triton.jit`` runs (it reads
``TRITON_INTERPRET`` then), so decorating at import would freeze whichever mode was active when
some unrelated module first imported this package. Note the limit: Triton's own standard library
(``tl.sum``, ``tl.max``, ``tl.cdiv``...) is decorated when ``triton`` is first imported, so the
interpreter only works in processes that had ``TRITON_INTERPRET=1`` before that import (the
tests run the interpreter cases in such a child process).

Kernels written for ``lazy_jit`` must not call other mmkit ``@triton.jit`` helpers (those would
be frozen at import); they inline their math instead. Globals they read must be ``tl.constexpr``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkit_kernels import dispatch

# Globals read inside kernels must be tl.constexpr (the compiler rejects plain Python globals;
# the interpreter does not check).
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), for erf GELU
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi), for GELU's derivative


class lazy_jit:
    """``kernel[grid](...)`` like a ``triton.jit`` function, compiled/interpreted on first use."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: dict[bool, object] = {}

    def get(self):
        key = dispatch.interpreter()
        k = self._compiled.get(key)
        if k is None:
            k = self._compiled[key] = triton.jit(self.fn)
        return k

    def __getitem__(self, grid):
        return self.get()[grid]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` multiplies raw bit patterns under the Triton interpreter: upcast there."""
    return dispatch.interpreter() and dtype == torch.bfloat16


def input_precision(dtype: torch.dtype) -> str | None:
    """fp32 dots follow torch's TF32 setting (torch's default is full IEEE fp32)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
