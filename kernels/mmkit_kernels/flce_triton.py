"""Triton softmax cross-entropy for one chunk of LM-head logits, gradient written in place.

One program per row: an online-softmax pass over the vocabulary (running max and rescaled sum,
fp32) gives ``lse``; the row's loss is ``lse - logits[label]``; a second pass overwrites the
logits with ``scale * (softmax - onehot(label))`` in the logits' dtype, so the chunk's gradient
needs no second [rows, V] buffer. Labels must be valid class indices (the caller selects the
supervised rows and checks the range on the host: ``device_assert`` is a no-op under the
interpreter and out-of-bounds loads are silent).
"""

from __future__ import annotations

import torch
import triton.language as tl

from mmkit_kernels import dispatch
from mmkit_kernels._triton import lazy_jit, next_pow2


def _ce_fwd_bwd_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr,
    V, scale,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)

    m = -float("inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    x_label = tl.load(base + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_label)

    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(cols == label, g - 1.0, g) * scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=ok)


_ce = lazy_jit(_ce_fwd_bwd_kernel)


def cross_entropy_inplace_triton(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, write_grad: bool = True, block_v: int | None = None
) -> torch.Tensor:
    """Per-row CE loss (fp32 [rows]) of ``logits`` [rows, V]; if ``write_grad``, ``logits`` is
    overwritten with ``scale * d(loss_row)/d(logits)``. ``labels`` must lie in [0, V)."""
    n, V = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n == 0:
        return loss
    if block_v is None:
        block_v = min(next_pow2(V), 16384 if dispatch.interpreter() else 4096)
    else:
        block_v = next_pow2(block_v)
    kw = {} if dispatch.interpreter() else {"num_warps": 8 if block_v >= 2048 else 4}
    _ce[(n,)](
        logits, logits.stride(0), labels.contiguous(), loss,
        V, float(scale),
        WRITE_GRAD=write_grad, BLOCK_V=block_v, **kw,
    )
    return loss
