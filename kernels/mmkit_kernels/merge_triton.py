"""Triton image-token merge: the token-embedding lookup and the image-feature copy in one pass.

Forward: program (t, column block) writes output row t once, from ``image_features[rank[t]]``
if token t is an image placeholder, else from ``embed_weight[input_ids[t]]``; image rows never
read the embedding table. ``rank`` comes from one int32 cumsum over the [T] placeholder vector:
no [T, H] mask, no ``nonzero``, no ``.item()``, so nothing waits on the host.

Backward: the same walk, scattering the output gradient to ``grad_features[rank[t]]`` (each row
written once) and atomically adding text rows into an fp32 ``grad_embed`` (atomics make the
summation order, hence the last bits of repeated-token gradients, run-dependent).

The placeholder/feature count check is done on the host by the caller (``merge.check_counts``):
``tl.device_assert`` never fires under the interpreter. If the counts disagree anyway (``check=
False``), the kernel stays in bounds: placeholders beyond the last feature row get zeros and
surplus feature rows are ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkit_kernels import dispatch
from mmkit_kernels._triton import lazy_jit, next_pow2


def _merge_fwd_kernel(
    ids_ptr, csum_ptr, table_ptr, feat_ptr, out_ptr,
    H, n_feat, last_feat, image_token_id,
    stride_t, stride_f, stride_o,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    tok = tl.load(ids_ptr + row)
    is_img = tok == image_token_id
    rank = tl.load(csum_ptr + row) - 1  # inclusive cumsum -> 0-based rank for image rows
    has_feat = is_img & (rank < n_feat)
    # Both row indices are made safe before any address is formed from them.
    text_row = tl.where(is_img, 0, tok).to(tl.int64)
    feat_row = tl.minimum(tl.maximum(rank, 0), last_feat).to(tl.int64)
    src = tl.where(is_img, feat_ptr + feat_row * stride_f + cols, table_ptr + text_row * stride_t + cols)
    vals = tl.load(src, mask=col_ok & (has_feat | (tok != image_token_id)), other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, vals, mask=col_ok)


def _merge_bwd_kernel(
    ids_ptr, csum_ptr, gout_ptr, gtable_ptr, gfeat_ptr,
    H, n_feat, last_feat, image_token_id,
    stride_go, stride_gt, stride_gf,
    WANT_TABLE: tl.constexpr, WANT_FEAT: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    tok = tl.load(ids_ptr + row)
    is_img = tok == image_token_id
    rank = tl.load(csum_ptr + row) - 1
    g = tl.load(gout_ptr + row.to(tl.int64) * stride_go + cols, mask=col_ok, other=0.0)
    if WANT_FEAT:
        has_feat = is_img & (rank < n_feat)
        feat_row = tl.minimum(tl.maximum(rank, 0), last_feat).to(tl.int64)
        tl.store(gfeat_ptr + feat_row * stride_gf + cols, g, mask=col_ok & has_feat)
    if WANT_TABLE:
        text_row = tl.where(is_img, 0, tok).to(tl.int64)
        tl.atomic_add(gtable_ptr + text_row * stride_gt + cols, g.to(tl.float32), mask=col_ok & (tok != image_token_id))


_merge_fwd = lazy_jit(_merge_fwd_kernel)
_merge_bwd = lazy_jit(_merge_bwd_kernel)


def _block_h(H: int, block_h: int | None) -> int:
    if block_h is not None:
        return next_pow2(block_h)
    # Interpreter: one program per row is fastest. GPU: 1024-wide column blocks.
    return min(next_pow2(H), 8192 if dispatch.interpreter() else 1024)


def _launch_args(flat_ids: torch.Tensor, image_token_id: int):
    ids = flat_ids.contiguous()
    csum = torch.cumsum((ids == image_token_id).to(torch.int32), 0, dtype=torch.int32)
    return ids, csum


class MergeImageFeaturesFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat_ids, embed_weight, image_features, image_token_id, block_h):
        T = flat_ids.shape[0]
        H = embed_weight.shape[1]
        ids, csum = _launch_args(flat_ids, image_token_id)
        out = torch.empty((T, H), device=embed_weight.device, dtype=embed_weight.dtype)
        table = embed_weight if embed_weight.stride(1) == 1 else embed_weight.contiguous()
        feats = image_features if image_features.stride(1) == 1 else image_features.contiguous()
        BH = _block_h(H, block_h)
        if T > 0 and H > 0:
            _merge_fwd[(T, triton.cdiv(H, BH))](
                ids, csum, table, feats, out,
                H, feats.shape[0], max(feats.shape[0] - 1, 0), image_token_id,
                table.stride(0), feats.stride(0), out.stride(0),
                BLOCK_H=BH,
            )
        ctx.save_for_backward(ids, csum)
        ctx.meta = (embed_weight.shape, image_features.shape, image_token_id, BH)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, csum = ctx.saved_tensors
        table_shape, feat_shape, image_token_id, BH = ctx.meta
        want_table, want_feat = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (want_table or want_feat):
            return None, None, None, None, None
        g = grad_out.contiguous()
        T, H = g.shape
        # fp32 accumulator for the table (atomic_add has no bf16 on every target); zeros so
        # rows no token uses, and feature rows no placeholder reached, get a zero gradient.
        gtable = torch.zeros(table_shape, device=g.device, dtype=torch.float32) if want_table else g
        gfeat = torch.zeros(feat_shape, device=g.device, dtype=g.dtype) if want_feat else g
        if T > 0 and H > 0:
            _merge_bwd[(T, triton.cdiv(H, BH))](
                ids, csum, g, gtable, gfeat,
                H, feat_shape[0], max(feat_shape[0] - 1, 0), image_token_id,
                g.stride(0), gtable.stride(0), gfeat.stride(0),
                WANT_TABLE=want_table, WANT_FEAT=want_feat, BLOCK_H=BH,
            )
        return (
            None,
            gtable.to(g.dtype) if want_table else None,
            gfeat if want_feat else None,
            None,
            None,
        )


def merge_image_features_triton(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    image_features: torch.Tensor | None,
    image_token_id: int,
    block_h: int | None = None,
) -> torch.Tensor:
    """Triton merge; same contract as ``merge.merge_image_features_torch`` (no count check here)."""
    H = embed_weight.shape[1]
    if image_features is None:
        image_features = embed_weight.new_empty((0, H))
    if image_features.dim() != 2 or image_features.shape[1] != H:
        raise ValueError(f"image_features must be [N, {H}], got {tuple(image_features.shape)}")
    # Same cast as the reference (differentiable; a no-op when the dtypes already agree).
    feats = image_features.to(embed_weight.dtype)
    out = MergeImageFeaturesFn.apply(input_ids.reshape(-1), embed_weight, feats, int(image_token_id), block_h)
    return out.reshape(*input_ids.shape, H)
