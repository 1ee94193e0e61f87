"""Triton kernels for the projector: one tiled GEMM with bias and a GELU epilogue, used for the
forward and the backward of ``linear`` and ``mlp2x_gelu``.

``C[M, N] = op_B(A[M, K] @ B[K, N]) (+ bias[N])`` with strides for every operand, so the
transposes the backward needs (``dY^T``, ``W^T``) are free. Epilogues:

* ``EPI_NONE``       C = acc (+ bias)
* ``EPI_GELU``       H = acc + bias is (optionally) stored as the pre-activation, C = gelu(H)
                     (exact erf GELU, as LLaVA's ``nn.GELU()``)
* ``EPI_GELU_GRAD``  C = acc * gelu'(H), H loaded from memory (the GELU backward, fused into
                     the ``dG = dY @ W2`` GEMM)

``B_GELU`` applies gelu() to the B operand as it is loaded, so the backward recomputes
gelu(H) inside the ``dW2 = dY^T @ gelu(H)`` GEMM instead of keeping it from the forward.
Accumulation is fp32; the dot runs in fp32 for bf16 under the interpreter (``DOT_F32``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkit_kernels._triton import INV_SQRT_2PI, SQRT1_2, dot_in_fp32, input_precision, lazy_jit, next_pow2
from mmkit_kernels import dispatch

EPI_NONE, EPI_GELU, EPI_GELU_GRAD = 0, 1, 2
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, h_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_H: tl.constexpr, B_GELU: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-blocks share their B column-blocks in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (rk + k0) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_GELU:
            bf = b.to(tl.float32)
            bf = 0.5 * bf * (1.0 + tl.math.erf(bf * SQRT1_2))
            b = bf.to(b_ptr.dtype.element_ty)  # round like the forward's stored activation
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    h_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_hm + rn[None, :].to(tl.int64) * stride_hn
    if EPILOGUE == 1:
        # Round the pre-activation to the storage dtype first, as an unfused torch graph would.
        hq = acc.to(c_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptrs, hq, mask=c_mask)
        x = hq.to(tl.float32)
        acc = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
    elif EPILOGUE == 2:
        x = tl.load(h_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(x * SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
        acc = acc * (cdf + x * pdf)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


_mm = lazy_jit(_mm_kernel)


def _blocks(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    if dispatch.interpreter():
        # Interpreter: every program instance costs ~1 ms of Python, so cover small problems
        # with as few programs as possible (tl.dot needs every block dim >= 16).
        return (min(64, max(16, next_pow2(M))), min(64, max(16, next_pow2(N))),
                min(64, max(16, next_pow2(K))), 8)
    return 64, 64, 32, 8


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    epilogue: int = EPI_NONE,
    h: torch.Tensor | None = None,
    store_h: bool = False,
    b_gelu: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``a [M, K] @ b [K, N]`` (any strides) with the fused bias/GELU options described above.

    ``h`` is the pre-activation buffer: written when ``epilogue=EPI_GELU, store_h=True``, read
    when ``epilogue=EPI_GELU_GRAD``.
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        c.zero_()
        if bias is not None:
            c += bias
        # Degenerate; the torch math is the definition here.
        if epilogue == EPI_GELU:
            if store_h:
                h.copy_(c)
            c = torch.nn.functional.gelu(c)
        elif epilogue == EPI_GELU_GRAD:
            c.zero_()
        return c
    hh = h if h is not None else c
    BM, BN, BK, GM = _blocks(M, N, K)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _mm[grid](
        a, b, c, bias if bias is not None else c, hh,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        hh.stride(0), hh.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, STORE_H=store_h, B_GELU=b_gelu,
        DOT_F32=dot_in_fp32(a.dtype), PRECISION=input_precision(a.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM,
    )
    return c


def _bias_grad(dy: torch.Tensor, bias: torch.Tensor | None, need: bool) -> torch.Tensor | None:
    if bias is None or not need:
        return None
    return dy.sum(0, dtype=torch.float32).to(bias.dtype)


class LinearProjectorFn(torch.autograd.Function):
    """y = x @ w^T + b with Triton GEMMs for forward and backward. x is [M, K]."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return matmul(x, w.t(), b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = matmul(dy, w) if ctx.needs_input_grad[0] else None  # [M,N] @ [N,K]
        dw = matmul(dy.t(), x) if ctx.needs_input_grad[1] else None  # [N,M] @ [M,K]
        db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class MlpGeluProjectorFn(torch.autograd.Function):
    """y = gelu(x @ w1^T + b1) @ w2^T + b2 (exact GELU). Saves x and the pre-activation only;
    gelu(h) is recomputed inside the dW2 GEMM and gelu'(h) inside the dG GEMM's epilogue."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        M = x.shape[0]
        need_grad = any(ctx.needs_input_grad)
        h = torch.empty((M, w1.shape[0]), device=x.device, dtype=x.dtype) if need_grad else None
        g = matmul(x, w1.t(), b1, epilogue=EPI_GELU, h=h, store_h=need_grad)
        y = matmul(g, w2.t(), b2)
        if need_grad:
            ctx.save_for_backward(x, w1, w2, h)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dy = dy.contiguous()
        dw2 = matmul(dy.t(), h, b_gelu=True) if need_w2 else None  # [N2,M] @ gelu([M,N1])
        db2 = dy.sum(0, dtype=torch.float32).to(dy.dtype) if ctx.has_b2 and need_b2 else None
        dx = dw1 = db1 = None
        if need_x or need_w1 or need_b1:
            dh = matmul(dy, w2, epilogue=EPI_GELU_GRAD, h=h)  # (dY @ W2) * gelu'(h): [M, N1]
            dx = matmul(dh, w1) if need_x else None  # [M,N1] @ [N1,K]
            dw1 = matmul(dh.t(), x) if need_w1 else None  # [N1,M] @ [M,K]
            db1 = dh.sum(0, dtype=torch.float32).to(dh.dtype) if ctx.has_b1 and need_b1 else None
        return dx, dw1, db1, dw2, db2


def supported(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the Triton projector handles these tensors (one float dtype, one device)."""
    return x.dtype in SUPPORTED_DTYPES and all(
        p is None or (p.dtype == x.dtype and p.device == x.device) for p in params
    )


def linear_projector_triton(x, w, b=None):
    lead = x.shape[:-1]
    y = LinearProjectorFn.apply(x.reshape(-1, x.shape[-1]), w, b)
    return y.reshape(*lead, w.shape[0])


def mlp_gelu_projector_triton(x, w1, b1, w2, b2):
    lead = x.shape[:-1]
    y = MlpGeluProjectorFn.apply(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)
    return y.reshape(*lead, w2.shape[0])
