"""Packing of per-view vision features for AnyRes (LLaVA-NeXT / 1.6) and OneVision ``anyres_max_N``.

Pure tensor functions (no parameters, no registry): the model owns ``image_newline`` and passes it in. The tensor ops
mirror the reference ones step by step (``LlavaNextModel.pack_image_features``, ``LlavaOnevisionModel
.pack_image_features`` / ``apply_pooling`` and the orig ``llava_arch.py`` 'spatial*' branches), so results are
bit-identical in fp32. The image parameters come as one ``mmkit.processing.spec.AnyResSpec`` (the model's
``image_spec``); the number of rows returned always equals ``mmkit.processing.anyres.anyres_num_tokens`` for the same
spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmkit.processing.anyres import (
    anyres_max_shape,
    grid_shape,
    num_views,
    unpad_geometry,
    video_pooled_side,
)
from mmkit.processing.spec import AnyResSpec

__all__ = [
    "pack_image_features",
    "pack_image_features_batch",
    "pack_video_features",
    "pool_video_features",
    "unpad_features",
]


def _side(num_patches: int) -> int:
    p = math.isqrt(num_patches)
    if p * p != num_patches:
        raise ValueError(f"features per view must be a square number of patches, got {num_patches}")
    return p


def unpad_features(grid: torch.Tensor, image_hw: Sequence[int], convention: str = "hf") -> torch.Tensor:
    """``unpad_image``: ``grid`` is ``[D, rows, cols]``; drops the rows/cols that cover the letterbox padding."""
    top, bottom, left, right = unpad_geometry(grid.shape[1:], image_hw, convention)
    return grid[:, top:bottom, left:right]


def pack_image_features(
    features: torch.Tensor,
    image_hw: Sequence[int],
    spec: AnyResSpec,
    image_newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn one image's view features ``[n_views, P*P, D]`` (view 0 = base, then tiles row-major) into ``[n, D]``,
    per ``spec.merge``:

    * ``spatial_unpad``: ``[base ; unpad(tiles as a (rows*P, cols*P) grid) (-> anyres_max bilinear downscale)
      with an ``image_newline`` column]``; a single view gives ``[feats ; newline]``.
    * ``spatial``: ``[base ; tiles in (row, y, col, x) order]`` (no newline).
    * ``flat``: all views concatenated.

    ``image_hw`` is the original image's (height, width) whatever the convention; the tile size is
    ``spec.image_size`` (the encoder's, 336/384). ``image_newline`` is given exactly when ``spec.newline``
    (``spec.newline=False`` omits the newline column, which HF allows; orig 'unpad' always has one).
    """
    merge = spec.merge
    if merge == "spatial_unpad" and spec.newline != (image_newline is not None):
        raise ValueError(
            f"pack_image_features: spec.newline is {spec.newline} but image_newline was "
            f"{'not passed' if image_newline is None else 'passed'} (pass it exactly when the model has one)"
        )
    if features.dim() != 3:
        raise ValueError(f"features must be [n_views, P*P, D], got shape {tuple(features.shape)}")
    if merge == "flat":
        return features.flatten(0, 1)

    if features.shape[0] == 1:
        feat = features[0]
        if merge == "spatial_unpad" and image_newline is not None:
            feat = torch.cat((feat, image_newline[None].to(feat)), dim=0)
        return feat

    P = _side(features.shape[1])
    rows, cols = grid_shape(image_hw, spec)
    expected = num_views(image_hw, spec)
    if features.shape[0] != expected:
        raise ValueError(
            f"image {tuple(image_hw)} needs {expected} views ({rows}x{cols} tiles + base), got {features.shape[0]}"
        )
    base = features[0]
    tiles = features[1:].view(rows, cols, P, P, -1)
    if merge == "spatial":
        tiles = tiles.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, tiles), dim=0)

    grid = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # [D, rows*P, cols*P]
    grid = unpad_features(grid, image_hw, spec.convention)
    down = anyres_max_shape(grid.shape[1], grid.shape[2], P, spec.anyres_max)
    if down is not None:
        grid = F.interpolate(grid[None], list(down), mode="bilinear")[0]
    if image_newline is not None:
        nl = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
        grid = torch.cat((grid, nl), dim=-1)
    grid = grid.flatten(1, 2).transpose(0, 1)
    return torch.cat((base, grid), dim=0)


def pack_image_features_batch(
    features: torch.Tensor | Sequence[torch.Tensor],
    image_sizes: Sequence[Sequence[int]],
    spec: AnyResSpec,
    image_newline: torch.Tensor | None = None,
    views_per_image: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Pack several images. ``features`` is either a list of per-image ``[n_views_i, P*P, D]`` tensors or all views
    concatenated on dim 0 (split by ``views_per_image``, default: the AnyRes view count of each size; pass 1 for
    OneVision multi-image entries). Returns the packed tensors and their lengths."""
    if isinstance(features, torch.Tensor):
        if views_per_image is None:
            views_per_image = [num_views(hw, spec) for hw in image_sizes]
        if sum(views_per_image) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} views given, the image sizes need {sum(views_per_image)}")
        features = torch.split(features, list(views_per_image), dim=0)
    if len(features) != len(image_sizes):
        raise ValueError(f"{len(features)} feature tensors for {len(image_sizes)} image sizes")
    out = [pack_image_features(f, hw, spec, image_newline) for f, hw in zip(features, image_sizes)]
    return out, [o.shape[0] for o in out]


def pool_video_features(features: torch.Tensor) -> torch.Tensor:
    """OneVision ``apply_pooling``: ``[frames, P*P, D]`` -> ``[frames, ceil(P/2)^2, D]``, bilinear (align_corners
    False)."""
    frames, n, dim = features.shape
    P = _side(n)
    x = features.view(frames, P, P, -1).permute(0, 3, 1, 2).contiguous()
    s = video_pooled_side(P)
    x = F.interpolate(x, size=[s, s], mode="bilinear")
    return x.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def pack_video_features(features: torch.Tensor, image_newline: torch.Tensor | None = None) -> torch.Tensor:
    """One video's frame features ``[frames, P*P, D]`` -> ``[frames*ceil(P/2)^2 (+1), D]``: pooled frames in order, then
    a single ``image_newline`` row after the whole video (HF ``get_video_features``)."""
    pooled = pool_video_features(features).flatten(0, 1)
    if image_newline is None:
        return pooled
    return torch.cat((pooled, image_newline[None].to(pooled.device, pooled.dtype)), dim=0)
