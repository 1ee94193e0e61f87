"""Image-token merge: embed the text tokens and splice image features in, in one pass.

Row ``t`` of the output is ``image_features[rank[t]]`` if ``input_ids[t] == image_token_id``
(``rank`` = running count of image tokens before ``t``, over the whole flattened batch) and
``embed_weight[input_ids[t]]`` otherwise. Neither path builds a [tokens, hidden] boolean mask
(``masked_scatter`` does, plus an int64 prefix sum over it) or syncs with the host; the count
check (``check=True``) is the one deliberate host sync. The Triton path (``merge_triton``) writes
each output row once and never reads the embedding table for image rows; the torch path is an
embedding lookup plus one ``index_copy_``.
"""

from __future__ import annotations

import torch

from mmkit_kernels import dispatch


def check_counts(input_ids: torch.Tensor, image_token_id: int, n_features: int) -> None:
    """Host-side check that placeholders and feature rows agree (kernels cannot assert)."""
    n_tokens = int((input_ids == image_token_id).sum())
    if n_tokens != n_features:
        raise ValueError(
            f"image features and image tokens do not match: the prompt has {n_tokens} image-token "
            f"placeholders (id {image_token_id}) but the images produced {n_features} feature rows; "
            "each <image> must be expanded by the processor to its image's token count"
        )


def image_positions(flat_ids: torch.Tensor, image_token_id: int, n_features: int) -> torch.Tensor:
    """Row index of each image placeholder, in order ([n_features], int64), without a host sync.

    ``rank = cumsum(is_img)`` (int32, O(T)); placeholder t scatters its own index to slot
    ``rank[t] - 1``. Text tokens go to private slots past the end (``n_features + t``), so every
    scatter index is distinct and the result does not depend on write order. The output size is
    known from ``n_features``, which is why no ``nonzero()`` (and no sync) is needed.
    """
    T = flat_ids.shape[0]
    is_img = flat_ids == image_token_id
    rank = torch.cumsum(is_img.to(torch.int32), 0, dtype=torch.int32) - 1
    ar = torch.arange(T, device=flat_ids.device)
    slot = torch.where(is_img & (rank < n_features), rank.long(), ar + n_features)
    pos = torch.full((n_features + T,), -1, device=flat_ids.device, dtype=torch.long)
    pos.scatter_(0, slot, ar)
    return pos[:n_features]


def merge_image_features_torch(
    input_ids: torch.Tensor, embed_weight: torch.Tensor, image_features: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """Reference merge. ``input_ids`` [..., T]; ``image_features`` [N, H]; returns [..., T, H].

    Sync-free: an embedding lookup (image rows read table row 0, then get overwritten) and one
    ``index_copy_`` of the feature rows at positions from ``image_positions``. Counts must match
    (``check_counts``); with a mismatch the result is undefined (index_copy_ raises on CPU).
    """
    flat = input_ids.reshape(-1)
    is_img = flat == image_token_id
    safe_ids = torch.where(is_img, torch.zeros_like(flat), flat)
    out = torch.nn.functional.embedding(safe_ids, embed_weight)
    if image_features is not None and image_features.shape[0] > 0:
        positions = image_positions(flat, image_token_id, image_features.shape[0])
        out = out.index_copy_(0, positions, image_features.to(out.dtype))
    return out.reshape(*input_ids.shape, embed_weight.shape[1])


def merge_image_features(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    image_features: torch.Tensor | None,
    image_token_id: int,
    check: bool = True,
) -> torch.Tensor:
    """The merge's one dispatch point (torch reference or Triton kernel)."""
    n = 0 if image_features is None else image_features.shape[0]
    if check:
        check_counts(input_ids, image_token_id, n)
    if dispatch.use_triton(embed_weight):
        try:
            # the Triton module imports triton: loaded only when a Triton path runs
            from mmkit_kernels.merge_triton import merge_image_features_triton
        except ImportError:
            pass
        else:
            dispatch.record("merge", "triton")
            return merge_image_features_triton(input_ids, embed_weight, image_features, image_token_id)
    dispatch.record("merge", "torch")
    return merge_image_features_torch(input_ids, embed_weight, image_features, image_token_id)
