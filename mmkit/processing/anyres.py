"""AnyRes geometry (LLaVA-NeXT / 1.6) and OneVision ``anyres_max_N``: pure integer/float arithmetic, no tensors.

Every size in this module's public API is ``(height, width)``. The image parameters come as one
``mmkit.processing.spec.AnyResSpec`` (tile size, grid pinpoints, convention, ``anyres_max``, merge, newline). The two
reference implementations read a config's ``image_grid_pinpoints`` differently, and the spec's ``convention`` says
which one to reproduce:

* ``"hf"``   (transformers): each stored pair is ``[h, w]``; ``select_best_resolution`` gets ``(H, W)``; unpad rounds
  with ``int(round(x, 7))``.
* ``"orig"`` (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT): each stored pair is ``[w, h]``; ``select_best_resolution``
  gets ``image.size == (W, H)``; unpad truncates with ``int(x)``.

The spec resolves the pair order when it is made (``spec.pinpoints_hw`` is always ``(h, w)``), so the functions here
never flip pairs; ``convention`` is left for the unpad rounding. For transpose-symmetric lists (llava-v1.6,
OneVision) the two readings only differ in tie-breaks and the rounding of a few sizes. Counts returned here are the
exact number of rows the model produces (see ``mmkit.connectors.anyres``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: mmkit.processing.spec imports this module
    from mmkit.processing.spec import AnyResSpec

__all__ = [
    "CONVENTIONS",
    "LLAVA_NEXT_PINPOINTS",
    "MERGES",
    "ONEVISION_PINPOINTS",
    "AnyResLayout",
    "anyres_layout",
    "anyres_max_shape",
    "anyres_num_tokens",
    "divide_to_tiles",
    "grid_shape",
    "multi_image_num_tokens",
    "num_views",
    "parse_anyres_max",
    "parse_grid_pinpoints",
    "resize_and_pad_geometry",
    "select_best_resolution",
    "single_view_num_tokens",
    "unpad_geometry",
    "unpadded_grid_shape",
    "video_num_tokens",
    "video_pooled_side",
]

CONVENTIONS = ("hf", "orig")
MERGES = ("flat", "spatial", "spatial_unpad")

#: llava-v1.6 ``image_grid_pinpoints`` (CLIP-336 tiles).
LLAVA_NEXT_PINPOINTS: list[list[int]] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: OneVision ``image_grid_pinpoints``: ``[384*i, 384*j]`` for i (outer), j (inner) in 1..6.
ONEVISION_PINPOINTS: list[list[int]] = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def _hw(size: Sequence[int]) -> tuple[int, int]:
    if hasattr(size, "tolist"):
        size = size.tolist()
    h, w = size
    return int(h), int(w)


def parse_grid_pinpoints(pinpoints, tile: int | None = None) -> list[list[int]]:
    """Normalise a config's ``image_grid_pinpoints`` to a list of ``[a, b]`` int pairs (order untouched).

    Accepts a list of pairs, its string literal (``"[[336, 672], ...]"``, the orig repo stores that form too) and the
    LLaVA-NeXT range form ``"(1x1),...,(6x6)"``, which expands to every ``(i, j)`` from the first to the last pair
    (i outer) scaled by ``tile``.
    """
    if isinstance(pinpoints, str):
        text = pinpoints.strip()
        if "x" in text:
            matches = re.findall(r"\((\d+)x(\d+)\)", text)
            if not matches:
                raise ValueError(f"cannot parse grid pinpoints {pinpoints!r}")
            if tile is None:
                raise ValueError("the '(AxB),...,(CxD)' pinpoint form needs the tile size")
            (a0, b0), (a1, b1) = tuple(map(int, matches[0])), tuple(map(int, matches[-1]))
            return [[i * tile, j * tile] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        nums = [int(x) for x in re.findall(r"-?\d+", text)]
        if len(nums) % 2 or not nums:
            raise ValueError(f"cannot parse grid pinpoints {pinpoints!r}")
        return [[nums[i], nums[i + 1]] for i in range(0, len(nums), 2)]
    out = []
    for pair in pinpoints:
        a, b = pair
        out.append([int(a), int(b)])
    if not out:
        raise ValueError("grid_pinpoints is empty")
    return out


def parse_anyres_max(value) -> int | None:
    """``9``, ``"9"``, ``"anyres_max_9"`` -> 9; ``None``/``"anyres"`` -> None."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(?:anyres_max_)?(\d+)", str(value).strip())
    if m:
        return int(m.group(1))
    if str(value).strip() == "anyres":
        return None
    raise ValueError(f"cannot parse anyres_max from {value!r}")


def select_best_resolution(image_hw: Sequence[int], spec: AnyResSpec) -> tuple[int, int]:
    """Best canvas ``(h, w)`` among ``spec.pinpoints_hw`` for an image of size ``image_hw``.

    Maximise the effective resolution ``min(int(W*s)*int(H*s), W*H)`` with ``s = min(cw/W, ch/H)``; ties go to the
    smaller waste ``cw*ch - eff``; remaining ties to the first candidate in the list. The float expressions are
    evaluated exactly as both references do; they are symmetric in the two axes, so with the pairs already read as
    ``(h, w)`` (see the module docstring) the two conventions pick alike.
    """
    height, width = _hw(image_hw)
    best = None
    max_eff = 0
    min_waste = float("inf")
    for ch, cw in spec.pinpoints_hw:
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best = eff, waste, (ch, cw)
    if best is None:
        raise ValueError("the image spec has no grid pinpoints (AnyRes needs model.image.grid_pinpoints)")
    return best


def resize_and_pad_geometry(image_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """Aspect-preserving resize into ``target_hw`` then centred black padding.

    Returns ``(new_h, new_w, top, left)``: resize the image to ``(new_h, new_w)`` and paste it at ``(top, left)`` of a
    zero canvas of ``target_hw`` (HF pads the remainder on the bottom/right; orig pastes at ``(diff // 2)``: same).
    """
    height, width = _hw(image_hw)
    th, tw = _hw(target_hw)
    scale_w = tw / width
    scale_h = th / height
    if scale_w < scale_h:
        new_w = tw
        new_h = min(math.ceil(height * scale_w), th)
    else:
        new_h = th
        new_w = min(math.ceil(width * scale_h), tw)
    return new_h, new_w, (th - new_h) // 2, (tw - new_w) // 2


def divide_to_tiles(canvas_hw: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the ``tile`` x ``tile`` crops of a canvas, row-major (y outer, x inner)."""
    h, w = _hw(canvas_hw)
    return [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]


def grid_shape(image_hw: Sequence[int], spec: AnyResSpec) -> tuple[int, int]:
    """``(rows, cols)`` of tiles for an image (HF ``get_anyres_image_grid_shape``; orig returns it as (cols, rows))."""
    bh, bw = select_best_resolution(image_hw, spec)
    return bh // spec.image_size, bw // spec.image_size


def num_views(image_hw: Sequence[int], spec: AnyResSpec) -> int:
    """Number of S x S views (S = ``spec.image_size``) fed to the encoder: 1 base view + one per canvas tile (ceil
    division, as HF ``image_size_to_num_patches`` iterates ``range(0, h, tile)``)."""
    bh, bw = select_best_resolution(image_hw, spec)
    tile = spec.image_size
    return 1 + (-(-bh // tile)) * (-(-bw // tile))


def unpad_geometry(
    current_hw: Sequence[int], image_hw: Sequence[int], convention: str = "hf"
) -> tuple[int, int, int, int]:
    """Rows/cols of a ``current_hw`` feature grid to keep after removing the letterbox padding.

    Returns ``(top, bottom, left, right)`` for ``grid[top:bottom, left:right]`` (reference ``unpad_image``). "orig" uses
    ``int(x)`` (``110x352`` keeps 14 cols), "hf" ``int(round(x, 7))`` (16 cols).
    """
    _check_convention(convention)
    cur_h, cur_w = _hw(current_hw)
    orig_h, orig_w = _hw(image_hw)
    rnd = (lambda x: int(round(x, 7))) if convention == "hf" else int
    if orig_w / orig_h > cur_w / cur_h:
        scale = cur_w / orig_w
        new_h = rnd(orig_h * scale)
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    scale = cur_h / orig_h
    new_w = rnd(orig_w * scale)
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def _slice_len(start: int, stop: int, n: int) -> int:
    return len(range(n)[start:stop])


def unpadded_grid_shape(current_hw: Sequence[int], image_hw: Sequence[int], convention: str = "hf") -> tuple[int, int]:
    """Shape of the feature grid after :func:`unpad_geometry` (Python slice semantics, as the tensor slice)."""
    cur_h, cur_w = _hw(current_hw)
    top, bottom, left, right = unpad_geometry(current_hw, image_hw, convention)
    return _slice_len(top, bottom, cur_h), _slice_len(left, right, cur_w)


def anyres_max_shape(h: int, w: int, patches_per_side: int, max_num: int | None) -> tuple[int, int] | None:
    """OneVision ``anyres_max_N`` downscale: ``ratio = sqrt(h*w / (N*P^2))``; if ``ratio > 1.1`` the unpadded grid is
    bilinearly resized to ``(int(h // ratio), int(w // ratio))``. Returns that size, or None when no resize happens."""
    if max_num is None:
        return None
    ratio = math.sqrt(h * w / (max_num * patches_per_side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return None


@dataclass(frozen=True)
class AnyResLayout:
    """Everything about one image's AnyRes processing, sizes as (h, w)."""

    image_hw: tuple[int, int]
    best_hw: tuple[int, int]  # canvas chosen by select_best_resolution
    resized_hw: tuple[int, int]  # image resized (aspect kept) inside the canvas
    paste_yx: tuple[int, int]  # where the resized image sits on the black canvas
    grid: tuple[int, int]  # (rows, cols) of tiles
    tile: int
    feature_hw: tuple[int, int]  # (rows*P, cols*P) feature grid before unpad
    unpad_box: tuple[int, int, int, int]  # (top, bottom, left, right) kept of the feature grid
    unpadded_hw: tuple[int, int]
    final_hw: tuple[int, int]  # after the anyres_max downscale (== unpadded_hw when none)
    patches_per_side: int

    @property
    def num_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


def anyres_layout(image_hw: Sequence[int], spec: AnyResSpec, patches_per_side: int) -> AnyResLayout:
    """Full AnyRes geometry for one image (pixels and features); ``patches_per_side`` = P features per tile side."""
    image_hw = _hw(image_hw)
    tile = spec.image_size
    best = select_best_resolution(image_hw, spec)
    nh, nw, top, left = resize_and_pad_geometry(image_hw, best)
    gh, gw = best[0] // tile, best[1] // tile
    P = patches_per_side
    feat = (gh * P, gw * P)
    box = unpad_geometry(feat, image_hw, spec.convention)
    unpadded = (_slice_len(box[0], box[1], feat[0]), _slice_len(box[2], box[3], feat[1]))
    down = anyres_max_shape(unpadded[0], unpadded[1], P, spec.anyres_max)
    return AnyResLayout(
        image_hw=image_hw,
        best_hw=best,
        resized_hw=(nh, nw),
        paste_yx=(top, left),
        grid=(gh, gw),
        tile=tile,
        feature_hw=feat,
        unpad_box=box,
        unpadded_hw=unpadded,
        final_hw=down if down is not None else unpadded,
        patches_per_side=P,
    )


def anyres_num_tokens(image_hw: Sequence[int], spec: AnyResSpec, patches_per_side: int) -> int:
    """Rows the model emits for one AnyRes image (base view + tiles), per ``spec.merge``:

    * ``spatial_unpad`` (LLaVA-1.6 / OneVision): ``P*P + h*(w + newline)`` with ``(h, w)`` the unpadded (and, with
      ``anyres_max``, downscaled) feature grid and ``newline`` = ``spec.newline``.
    * ``spatial``: ``P*P + rows*cols*P*P`` (tiles re-ordered, nothing dropped, no newline).
    * ``flat``: every view flattened, ``num_views * P*P``.
    """
    P = patches_per_side
    if spec.merge == "flat":
        return num_views(image_hw, spec) * P * P
    lay = anyres_layout(image_hw, spec, P)
    if spec.merge == "spatial":
        return P * P + lay.grid[0] * lay.grid[1] * P * P
    h, w = lay.final_hw
    return P * P + h * (w + (1 if spec.newline else 0))


def _single_view_rows(patches_per_side: int, merge: str, has_newline: bool) -> int:
    return patches_per_side**2 + (1 if (merge == "spatial_unpad" and has_newline) else 0)


def single_view_num_tokens(spec: AnyResSpec, patches_per_side: int) -> int:
    """Rows for a single-view image (square/pad flows, OneVision multi-image): ``P*P``, plus one newline row when
    ``spec.merge`` is ``spatial_unpad`` and ``spec.newline`` (orig 'unpad' branch / HF Next+OV
    ``pack_image_features`` with one view)."""
    return _single_view_rows(patches_per_side, spec.merge, spec.newline)


def multi_image_num_tokens(patches_per_side: int, has_newline: bool = True) -> int:
    """OneVision multi-image samples: each image is one padded square view -> ``P*P + 1`` (730 for SigLIP-384)."""
    return _single_view_rows(patches_per_side, "spatial_unpad", has_newline)


def video_pooled_side(patches_per_side: int) -> int:
    """OneVision video: each frame's ``P x P`` grid is bilinearly pooled to ``ceil(P/2)`` per side (27 -> 14)."""
    return math.ceil(patches_per_side / 2)


def video_num_tokens(num_frames: int, patches_per_side: int, has_newline: bool = True) -> int:
    """OneVision video: ``frames * ceil(P/2)^2`` plus one newline after the whole video."""
    s = video_pooled_side(patches_per_side)
    return num_frames * s * s + (1 if has_newline else 0)
