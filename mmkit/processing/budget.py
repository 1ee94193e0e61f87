"""One memory budget for every image mmkit decodes: the server, ``mmkit.chat``, ``mmkit.eval`` and training data.

Four limits, each checked before the step it protects:

* ``max_bytes``: encoded bytes (before anything is parsed);
* ``max_pixels``: width x height from the header (``Image.open`` reads the header only; pixels are decoded by
  ``load()``, after the checks), so a decompression bomb is refused without being expanded;
* ``max_aspect``: the long side over the short side (a 4,000,000 x 1 PNG is a few KB);
* ``max_resized_pixels``: the largest buffer the preprocessing will allocate for this image *after* decoding: the
  shortest-edge resize (a 1-pixel-high image becomes tile-high and millions wide), the ``pad`` square of side
  ``max(w, h)``, the AnyRes canvas. It is computed from the header size with the preprocessing's own geometry.

The defaults are generous for real photos and documents (a 48 MP phone photo, a long screenshot) and refuse the
few-byte images that would cost gigabytes. Each front end names the setting that raises a limit: ``CLI_FLAGS``
(server, chat, eval) or ``RECIPE_KEYS`` (training: ``data.image_limits.*``).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmkit.processing import anyres as _ar

__all__ = ["CLI_FLAGS", "DEFAULTS", "RECIPE_KEYS", "ImageLimitError", "ImageLimits", "add_image_limit_flags",
           "limits_from_args", "parse_size", "resized_pixels", "shortest_edge_size"]

DEFAULTS = {
    "max_bytes": 20 * 1024 * 1024,  # 20 MiB encoded
    "max_pixels": 50_000_000,  # 50 MP decoded: a 48 MP (8064 x 6048) photo fits
    "max_aspect": 50.0,  # long side / short side: a 1080 x 20000 scrolling screenshot is 1:18.5
    "max_resized_pixels": 100_000_000,  # after resize/pad: the pad square of a 50 MP 4:3 photo is 67 MP
}
CLI_FLAGS = {"max_bytes": "--max-image-bytes", "max_pixels": "--max-pixels", "max_aspect": "--max-image-aspect",
             "max_resized_pixels": "--max-resized-pixels"}
RECIPE_KEYS = {name: f"data.image_limits.{name}" for name in DEFAULTS}


class ImageLimitError(ValueError):
    """An image over one of the limits; ``limit`` is the field name, the message names the setting to raise."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


def _num(x: float) -> str:
    """2.5 -> "2.5", 4000000.0 -> "4000000" (no exponent)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """transformers ``get_resize_output_image_size(size, default_to_square=False)``: (new_h, new_w)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def resized_pixels(image_processor, image_hw: tuple[int, int]) -> int:
    """Pixels of the largest buffer ``image_processor`` (a ``mmkit.processing.image.ImageProcessor``) allocates
    for an image of ``image_hw`` = (h, w) after decoding: every flow the image may take is counted (an AnyRes
    model with ``anyres_max`` pads each image of a multi-image sample to a square)."""
    spec = image_processor.spec
    s = spec.image_size
    h, w = int(image_hw[0]), int(image_hw[1])
    pad = max(h, w) ** 2  # expand_to_square's canvas
    if spec.aspect_ratio == "anyres":
        bh, bw = _ar.select_best_resolution((h, w), spec)
        nh, nw, _, _ = _ar.resize_and_pad_geometry((h, w), (bh, bw))
        out = max(bh * bw, nh * nw, s * s)
        return max(out, pad) if spec.anyres_max is not None else out
    if spec.aspect_ratio == "square":
        if image_processor.resize_mode == "squash":
            return s * s
        nh, nw = shortest_edge_size(h, w, s)
        return max(nh * nw, s * s)
    return max(pad, s * s)


@dataclass(frozen=True)
class ImageLimits:
    """The four limits (see the module docstring) and ``names``: the setting that raises each, for messages."""

    max_bytes: int = DEFAULTS["max_bytes"]
    max_pixels: int = DEFAULTS["max_pixels"]
    max_aspect: float = DEFAULTS["max_aspect"]
    max_resized_pixels: int = DEFAULTS["max_resized_pixels"]
    names: Mapping[str, str] = field(default_factory=lambda: dict(CLI_FLAGS), compare=False, repr=False)

    def __post_init__(self):
        for name in DEFAULTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
                raise ValueError(f"{self.names.get(name, name)}: expected a positive number, got {value!r}")
        if self.max_aspect < 1:
            raise ValueError(f"{self.names.get('max_aspect', 'max_aspect')}: expected a number >= 1 (long side / "
                             f"short side), got {self.max_aspect!r}")

    @classmethod
    def from_config(cls, cfg: Any = None, names: Mapping[str, str] = RECIPE_KEYS) -> ImageLimits:
        """From any object (or mapping) with some of the four fields; missing or None ones are the defaults."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        given = {k: get(k, None) for k in DEFAULTS} if cfg is not None else {}
        return cls(**{k: v for k, v in given.items() if v is not None}, names=dict(names))

    def _fail(self, limit: str, what: str, value) -> ImageLimitError:
        return ImageLimitError(limit, f"image is too large: {what}, the limit is {value} "
                                      f"(raise it with {self.names.get(limit, limit)})")

    # ------------------------------------------------------------------ the checks, cheapest first
    def check_bytes(self, n: int) -> None:
        if n > self.max_bytes:
            raise self._fail("max_bytes", f"{n} bytes", f"{self.max_bytes} bytes")

    def check_size(self, width: int, height: int, image_processor=None) -> None:
        """Header size -> decoded pixels, aspect ratio and (with ``image_processor``) the size after resize/pad."""
        if width <= 0 or height <= 0:
            raise ImageLimitError("max_pixels", f"image has no pixels: {width}x{height}")
        if width * height > self.max_pixels:
            raise self._fail("max_pixels", f"{width}x{height} = {width * height} pixels", f"{self.max_pixels} pixels")
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            raise self._fail("max_aspect", f"{width}x{height} has an aspect ratio of {_num(aspect)}:1",
                             f"{_num(self.max_aspect)}:1")
        if image_processor is not None:
            n = resized_pixels(image_processor, (height, width))
            if n > self.max_resized_pixels:
                raise self._fail("max_resized_pixels", f"{width}x{height} becomes {n} pixels after resize/pad "
                                 f"({image_processor.spec.aspect_ratio})", f"{self.max_resized_pixels} pixels")

    def allow_in_pil(self) -> None:
        """PIL refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` on its own (``DecompressionBombError``): a
        higher ``max_pixels`` raises PIL's bound too (never lowers it; it is process-wide)."""
        from PIL import Image  # PIL loads with the first image: the CLIs' --help stays light

        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels

    def open(self, source, image_processor=None):
        """A file path, bytes or binary file -> a decoded RGB image, every limit checked before the decode.

        Raises :class:`ImageLimitError` for a limit; the decoder's own errors (``FileNotFoundError``,
        ``PIL.UnidentifiedImageError``, ``OSError`` for a truncated file) pass through."""
        from PIL import Image  # PIL loads with the first image: the CLIs' --help stays light

        if isinstance(source, (bytes, bytearray, memoryview)):
            self.check_bytes(len(source))
            source = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            self.check_bytes(os.path.getsize(source))
        else:  # a binary file object: its remaining length
            pos = source.tell()
            self.check_bytes(source.seek(0, os.SEEK_END) - pos)
            source.seek(pos)
        self.allow_in_pil()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit, not PIL's
            try:
                im = Image.open(source)  # the header only
            except Image.DecompressionBombError as exc:
                raise self._fail("max_pixels", str(exc).split(" could be")[0], f"{self.max_pixels} pixels") from None
            with im:
                self.check_size(im.width, im.height, image_processor)
                im.load()
                return im.convert("RGB")


def parse_size(text: str | int) -> int:
    """``"20MB"`` / ``"512KiB"`` / ``"1000"`` -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 20MB, 512KiB, 1000000)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
              "KI": 1024, "KIB": 1024, "MI": 1024**2, "MIB": 1024**2, "GI": 1024**3, "GIB": 1024**3}
    return int(value * powers[unit])


def add_image_limit_flags(p: argparse.ArgumentParser) -> None:
    """The budget's command-line flags (``CLI_FLAGS``), shared by the server, mmkit.chat and mmkit.eval."""
    g = p.add_argument_group("image limits (per image, checked from the header before decoding)")
    g.add_argument("--max-image-bytes", type=parse_size, default=DEFAULTS["max_bytes"],
                   help="encoded bytes, e.g. 20MB, 5MiB (default: 20MiB)")
    g.add_argument("--max-pixels", type=int, default=DEFAULTS["max_pixels"],
                   help="width*height (default: %(default)s)")
    g.add_argument("--max-image-aspect", type=float, default=DEFAULTS["max_aspect"],
                   help="long side / short side (default: %(default)s)")
    g.add_argument("--max-resized-pixels", type=int, default=DEFAULTS["max_resized_pixels"],
                   help="the largest buffer the preprocessing allocates after resize/pad, e.g. the 'pad' square "
                        "of side max(w, h) (default: %(default)s)")


def limits_from_args(args) -> ImageLimits:
    """The :class:`ImageLimits` of the flags of :func:`add_image_limit_flags`."""
    return ImageLimits(args.max_image_bytes, args.max_pixels, args.max_image_aspect, args.max_resized_pixels,
                       names=dict(CLI_FLAGS))
