"""Fused linear cross-entropy (FLCE) for the LM head: ``mean CE(hidden @ weight.T, labels)``
without ever materializing the full [tokens, vocab] logits.

Labels are **already shifted** by the caller: ``labels[i]`` is the target for ``hidden[i]``
(for a causal LM pass ``hidden[:, :-1]`` and ``labels[:, 1:]``). Positions labelled
``ignore_index`` (-100: image tokens, system/user turns, padding) do not enter the loss.

How (after Liger-Kernel's FLCE):

1. Only the supervised rows go to the head: ``hidden[labels != ignore_index]``. In LLaVA training
   that is usually a minority of positions, so this cuts the head's FLOPs as well as its memory.
   (This costs one host sync, for ``nonzero``: the supervised count fixes every shape after it.)
2. The supervised rows are processed in chunks. Per chunk: ``logits = h_c @ W.T`` (cuBLAS /
   torch), then a softmax-CE step that yields the rows' losses and overwrites the chunk's logits
   with ``d loss / d logits`` (Triton kernel on the Triton path, torch ops otherwise), then
   ``grad_h[c] = dlogits @ W`` and ``grad_W += dlogits.T @ h_c``. The gradients are computed
   during the forward; backward only scales them by the incoming gradient. Peak extra memory
   is one chunk of logits (fp32 plus a low-precision copy of its gradient on the torch path, in
   the input dtype only on the Triton path) and ``grad_W``.
3. ``grad_W`` accumulates in the weight's dtype (``addmm_``: each chunk's product in fp32, then
   one rounding per chunk), as Liger does; fp32 weights accumulate exactly in fp32.

Returns a float32 scalar (mean over supervised tokens, or sum with ``reduction="sum"``). With no
supervised token it returns 0 attached to the graph (zero gradients), not NaN as
``F.cross_entropy`` does. Backward can run once per forward (the precomputed gradients are
handed over and freed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmkit_kernels import dispatch


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Liger's rule: chunk logits about as large as the hidden states they come from
    (``n / ceil(V / H)`` rows, rounded up to a power of two). Floor: enough rows for a chunk of
    ~4M logits (16 MiB in fp32; 32 rows at V=152k, 256 at V=32k), so small batches do not
    degrade into many skinny GEMMs."""
    inc = max(1, -(-vocab_size // max(hidden_size, 1)))
    floor = _next_pow2(max(32, (1 << 22) // max(vocab_size, 1)))
    return max(floor, _next_pow2(-(-n_rows // inc)))


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The unfused oracle: full logits (upcast to fp32, as HF's causal-LM loss does), then
    ``F.cross_entropy``. NaN (0/0) when no token is supervised and ``reduction="mean"``."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def _ce_chunk_torch(logits: torch.Tensor, labels: torch.Tensor, scale: float, want_grad: bool):
    """Per-row loss and ``scale * (softmax - onehot)``, both fp32, from fp32 ``logits`` [c, V],
    which are overwritten by the gradient (two passes over the chunk after the logsumexp)."""
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - logits.gather(1, labels[:, None]).squeeze(1)
    if not want_grad:
        return loss, None
    # scale * softmax = exp(x - lse + log(scale)): the scale folds into the exponent.
    g = logits.sub_((lse - math.log(scale))[:, None]).exp_()
    g.scatter_add_(1, labels[:, None], g.new_full((g.shape[0], 1), -scale))
    return loss, g


def _chunked(h, w, y, scale, chunk, ce_triton, need_h, need_w):
    """Loss sum (fp32 scalar) and, if asked, grad_h [n, H] and grad_w [V, H] (already * scale)."""
    n = h.shape[0]
    want_grad = need_h or need_w
    gh = torch.empty_like(h) if need_h else None
    gw = torch.zeros_like(w) if need_w else None
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc, yc = h[s:e], y[s:e]
        if ce_triton is not None:
            # [c, V] in the input dtype; the kernel upcasts per block and writes the grad in place.
            g = hc @ w.t()
            loss = ce_triton(g, yc, scale, write_grad=want_grad)
        else:
            # fp32 logits (the low-precision product is freed at once), grad in place.
            loss, g = _ce_chunk_torch((hc @ w.t()).float(), yc, scale, want_grad)
        total += loss.sum()
        if want_grad:
            g = g.to(h.dtype)  # no-op on the Triton path
            if need_h:
                torch.mm(g, w, out=gh[s:e])
            if need_w:
                gw.addmm_(g.t(), hc)
    return total, gh, gw


class FusedLinearCrossEntropyFn(torch.autograd.Function):
    """Inputs are the already-selected supervised rows ``h`` [n, H], ``w`` [V, H], ``y`` [n]."""

    @staticmethod
    def forward(ctx, h, w, y, scale, chunk, ce_triton):
        total, gh, gw = _chunked(h, w, y, scale, chunk, ce_triton, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (gh, gw)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice; its gradients are precomputed in the "
                "forward and freed after the first backward (recompute the loss instead of retain_graph)"
            )
        gh, gw = ctx.grads
        ctx.grads = None
        # In place: these buffers are ours and used once (avoids another [V, H] allocation).
        if gh is not None:
            gh.mul_(grad_out.to(gh.dtype))
        if gw is not None:
            gw.mul_(grad_out.to(gw.dtype))
        return gh, gw, None, None, None, None


def _ce_impl(t: torch.Tensor):
    if not dispatch.use_triton(t):
        return None
    try:
        # the Triton module imports triton: loaded only when a Triton path runs
        from mmkit_kernels.flce_triton import cross_entropy_inplace_triton
    except ImportError:
        return None
    return cross_entropy_inplace_triton if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without the full logits.

    ``hidden`` [..., H] (e.g. [N, H] or [B, T, H]); ``weight`` [V, H] (the LM head, ``nn.Linear``
    layout, no bias); ``labels`` [...] matching ``hidden``'s leading dims, **already shifted**
    (``labels[i]`` is the target of ``hidden[i]``). Rows with ``ignore_index`` are dropped before
    the head. ``chunk_size`` = supervised rows per chunk (default ``default_chunk_size``).
    Returns a float32 scalar: mean over supervised tokens (``reduction="mean"``) or their sum
    (``"sum"``); 0 with a graph when nothing is supervised.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}], got {tuple(weight.shape)}")
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)

    supervised = y != ignore_index
    idx = supervised.nonzero().squeeze(1)  # the one unavoidable host sync: n fixes the shapes
    n = idx.numel()
    if n == 0:
        # Zero with a graph: empty sums keep both inputs attached and give zero gradients.
        return (h[:0].sum() + weight[:0].sum()).float()
    if n < h.shape[0]:
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    y = y.long()
    if bool(((y < 0) | (y >= V)).any()):
        raise ValueError(f"labels must be in [0, {V}) or ignore_index ({ignore_index})")

    ce_triton = _ce_impl(h)
    dispatch.record("flce", "triton" if ce_triton is not None else "torch")
    scale = 1.0 / n if reduction == "mean" else 1.0
    chunk = max(1, int(chunk_size)) if chunk_size else default_chunk_size(n, H, V)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropyFn.apply(h, weight, y, scale, chunk, ce_triton)
    total, _, _ = _chunked(h, weight, y, scale, chunk, ce_triton, False, False)
    return total * scale
