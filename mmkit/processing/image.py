"""Image preprocessing for LLaVA-style models: square / pad (LLaVA-1.5) / AnyRes (LLaVA-1.6, OneVision).

What to produce comes from one ``mmkit.processing.spec.AnyResSpec`` (the model's ``image_spec``). Two numerically
pinned backends (``spec.backend``):

* ``backend="pil"``: PIL bicubic resizing, float32 rescale+normalize. Bit-exact with transformers' PIL-backend
  processors (``CLIPImageProcessorPil``, ``LlavaImageProcessorPil``, ``LlavaNextImageProcessorPil``,
  ``LlavaOnevisionImageProcessorPil``, ``SiglipImageProcessorPil``) and hence with the original LLaVA pipeline, which
  ran transformers 4.36's PIL/numpy processors.
* ``backend="fast"``: uint8 ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` then the fused
  ``(x - 255*mean) / (255*std)``; bit-exact with transformers 5.x default (torchvision-backend) processors
  (``CLIPImageProcessor``, ``LlavaImageProcessor``, ``LlavaNextImageProcessor``, ``LlavaOnevisionImageProcessor``,
  ``SiglipImageProcessor``). The two backends differ from each other by up to ~0.03 (normalized units).

("Bit-exact": max abs diff 0.0 in tests/test_image_processing.py on torch 2.14 / torchvision 0.29 / Pillow 12; the
tests assert <= 1e-5.) Both write straight into one preallocated ``[n_views, 3, S, S]`` float32 tensor: the AnyRes
image is resized once into a uint8 letterbox canvas, cut into tiles by a strided view (no copy) and normalized in
place; with the PIL backend the base view is resized and normalized on a helper thread meanwhile (PIL releases the
GIL), see ``parallel_resize``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmkit.processing import anyres as _ar
from mmkit.processing.budget import shortest_edge_size as _shortest_edge_size  # the image budget sizes alike
from mmkit.processing.spec import (
    ASPECT_RATIOS,
    BACKENDS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    AnyResSpec,
)

__all__ = [
    "ASPECT_RATIOS",
    "BACKENDS",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RESIZE_MODES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageProcessor",
    "background_color",
    "expand_to_square",
    "to_rgb",
]

IMAGENET_STANDARD_MEAN = SIGLIP_MEAN
IMAGENET_STANDARD_STD = SIGLIP_STD

RESIZE_MODES = ("shortest_edge_crop", "squash")

_BICUBIC = Image.Resampling.BICUBIC


def background_color(mean: Sequence[float]) -> tuple[int, ...]:
    """Padding colour for the 'pad' flow: ``int(m * 255)`` per channel (truncation): (122, 116, 104) for CLIP,
    (127, 127, 127) for SigLIP."""
    return tuple(int(m * 255) for m in mean)


def to_rgb(image, convention: str = "hf") -> Image.Image:
    """Any PIL image (or HWC/HW uint8 array, CHW uint8 tensor) -> RGB PIL image.

    ``convention="hf"`` composites transparency onto white (transformers' ``convert_to_rgb``); ``"orig"`` is a plain
    ``image.convert("RGB")`` (what the original repo and transformers 4.36 did: alpha is dropped, not composited).
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise TypeError(f"array images must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        image = Image.fromarray(np.ascontiguousarray(arr))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 array or a uint8 tensor, got {type(image).__name__}")
    if convention == "hf" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """LLaVA ``expand2square``: paste onto a ``max(w, h)`` square of ``background``, centred on the short axis
    (offset ``(long - short) // 2``). Returns the image itself when already square."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(background))
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


class ImageProcessor:
    """Turns PIL images into encoder views.

    Args:
        spec: the image parameters (:class:`~mmkit.processing.spec.AnyResSpec`): ``image_size`` S (encoder input /
            AnyRes tile size), ``aspect_ratio`` (``"square"``: resize per ``resize_mode``; ``"pad"``: expand to a
            square of the mean colour, then resize to S x S; ``"anyres"``: base view + tiles, also for
            ``anyres_max_N``), the grid pinpoints, ``convention`` (AnyRes unpad rounding and RGBA handling),
            ``anyres_max`` (only changes token counts; pixels are plain AnyRes), ``merge`` and ``newline`` (token
            counts), ``mean``/``std`` and ``backend`` (``"pil"``: parity with PIL/numpy processors and the original
            repo; ``"fast"``: parity with transformers' default torchvision processors).
        resize_mode: ``"shortest_edge_crop"`` (CLIP: shortest edge -> S, centre crop) or ``"squash"`` (SigLIP:
            straight to S x S).
        parallel_resize: PIL backend, AnyRes: resize the base view on a helper thread while the caller's thread
            resizes the canvas (PIL releases the GIL; used only when the process may run on more than one CPU).

    The presets (:meth:`clip`, :meth:`siglip`, :meth:`llava15`, :meth:`llava_next`, :meth:`onevision`) take the
    keywords of :meth:`AnyResSpec.create <mmkit.processing.spec.AnyResSpec.create>` (pinpoints as stored).
    """

    def __init__(
        self,
        spec: AnyResSpec,
        resize_mode: str = "shortest_edge_crop",
        parallel_resize: bool = True,
    ):
        if not isinstance(spec, AnyResSpec):
            raise TypeError(f"ImageProcessor takes an AnyResSpec (see AnyResSpec.create), got {type(spec).__name__}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.spec = spec
        self.resize_mode = resize_mode
        self.background = background_color(self.mean)
        self.parallel_resize = bool(parallel_resize)
        mean32 = torch.tensor(self.mean, dtype=torch.float32)
        std32 = torch.tensor(self.std, dtype=torch.float32)
        # PIL twin: f32(x/255) - f32(mean), / f32(std) (numpy float32 ops; x/255 in f32 == f32(f64(x) * (1/255))).
        # fast twin: (f32(x) - f32(mean)*255) / (f32(std)*255) (transformers' fused rescale+normalize).
        if spec.backend == "pil":
            self._m, self._s, self._scale = mean32.view(3, 1, 1), std32.view(3, 1, 1), 255.0
        else:
            self._m, self._s, self._scale = (mean32 * 255.0).view(3, 1, 1), (std32 * 255.0).view(3, 1, 1), None

    # the spec's fields, read-only
    image_size = property(lambda self: self.spec.image_size)
    mean = property(lambda self: self.spec.mean)
    std = property(lambda self: self.spec.std)
    aspect_ratio = property(lambda self: self.spec.aspect_ratio)
    convention = property(lambda self: self.spec.convention)
    anyres_max = property(lambda self: self.spec.anyres_max)
    backend = property(lambda self: self.spec.backend)

    # ------------------------------------------------------------------ presets
    @classmethod
    def _preset(cls, image_size: int, mean, std, resize_mode: str, kw: dict) -> ImageProcessor:
        parallel_resize = kw.pop("parallel_resize", True)
        kw.setdefault("mean", mean)
        kw.setdefault("std", std)
        return cls(AnyResSpec.create(image_size, **kw), resize_mode=resize_mode, parallel_resize=parallel_resize)

    @classmethod
    def clip(cls, image_size: int = 336, **kw) -> ImageProcessor:
        """CLIP: shortest edge -> S, centre crop (``aspect_ratio='square'``)."""
        kw.setdefault("aspect_ratio", "square")
        return cls._preset(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "shortest_edge_crop", kw)

    @classmethod
    def siglip(cls, image_size: int = 384, **kw) -> ImageProcessor:
        """SigLIP: squash to S x S, mean = std = 0.5."""
        kw.setdefault("aspect_ratio", "square")
        return cls._preset(image_size, SIGLIP_MEAN, SIGLIP_STD, "squash", kw)

    @classmethod
    def llava15(cls, **kw) -> ImageProcessor:
        """LLaVA-1.5: CLIP-336 with ``image_aspect_ratio='pad'``."""
        kw.setdefault("aspect_ratio", "pad")
        return cls.clip(336, **kw)

    @classmethod
    def llava_next(cls, **kw) -> ImageProcessor:
        """LLaVA-1.6 (CLIP-336, llava-v1.6 pinpoints)."""
        kw.setdefault("grid_pinpoints", _ar.LLAVA_NEXT_PINPOINTS)
        return cls.clip(336, aspect_ratio="anyres", **kw)

    @classmethod
    def onevision(cls, **kw) -> ImageProcessor:
        """LLaVA-OneVision (SigLIP-384, 6x6 pinpoints, anyres_max_9)."""
        kw.setdefault("grid_pinpoints", _ar.ONEVISION_PINPOINTS)
        kw.setdefault("anyres_max", 9)
        return cls.siglip(384, aspect_ratio="anyres", **kw)

    def __repr__(self) -> str:
        return f"ImageProcessor({self.spec!r}, resize_mode={self.resize_mode!r})"

    # ------------------------------------------------------------------ public API
    def preprocess(self, image, multi_image: bool = False) -> torch.Tensor:
        """One image -> ``[n_views, 3, S, S]`` float32 (1 view for square/pad; base + row-major tiles for AnyRes).

        ``multi_image=True`` reproduces OneVision's multi-image samples: an AnyRes processor then emits a single
        mean-colour-padded S x S view.
        """
        return self._views(to_rgb(image, self.convention), multi_image)

    def __call__(self, images, multi_image: bool | Sequence[bool] = False) -> dict:
        """``images``: a PIL image or a list of them. Returns ``{"pixel_values": [ [n_i, 3, S, S] ... ],
        "image_sizes": [(h, w) ...]}`` (sizes of the original images, HF order)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        flags = [multi_image] * len(images) if isinstance(multi_image, bool) else list(multi_image)
        if len(flags) != len(images):
            raise ValueError(f"{len(flags)} multi_image flags for {len(images)} images")
        pixel_values, sizes = [], []
        for im, mi in zip(images, flags):
            rgb = to_rgb(im, self.convention)
            sizes.append((rgb.height, rgb.width))
            pixel_values.append(self._views(rgb, mi))
        return {"pixel_values": pixel_values, "image_sizes": sizes}

    def preprocess_video(self, frames: Sequence) -> torch.Tensor:
        """Video frames -> ``[T, 3, S, S]``: each frame resized per ``resize_mode`` (OneVision: squash to S x S),
        never tiled or padded."""
        return torch.cat([self._square(to_rgb(f, self.convention)) for f in frames], dim=0)

    def num_views(self, image_hw: Sequence[int], multi_image: bool = False) -> int:
        if self.spec.aspect_ratio != "anyres" or multi_image:
            return 1
        return _ar.num_views(image_hw, self.spec)

    def num_image_tokens(self, image_hw: Sequence[int], patches_per_side: int, multi_image: bool = False) -> int:
        """Exact number of feature rows the model produces for an image of size ``image_hw`` = (h, w), per the
        spec's ``merge`` and ``newline``.

        ``patches_per_side`` = P = S // patch (24 for CLIP-L/14-336, 27 for SigLIP-384), features per view after
        any CLS drop = P*P.
        """
        if self.spec.aspect_ratio == "anyres" and not multi_image:
            return _ar.anyres_num_tokens(image_hw, self.spec, patches_per_side)
        return _ar.single_view_num_tokens(self.spec, patches_per_side)

    def num_video_tokens(self, num_frames: int, patches_per_side: int) -> int:
        """OneVision video rows: ``frames * ceil(P/2)^2``, plus one newline when the spec has one."""
        return _ar.video_num_tokens(num_frames, patches_per_side, self.spec.newline)

    # ------------------------------------------------------------------ flows
    def _views(self, img: Image.Image, multi_image: bool) -> torch.Tensor:
        if self.aspect_ratio == "anyres" and not multi_image:
            return self._anyres(img)
        if self.aspect_ratio == "square":
            return self._square(img)
        return self._pad(img)  # 'pad', and AnyRes images of a OneVision multi-image sample

    def _square(self, img: Image.Image) -> torch.Tensor:
        S = self.image_size
        h, w = img.height, img.width
        if self.resize_mode == "squash":
            return self._finish([self._resize(img, S, S)])
        nh, nw = _shortest_edge_size(h, w, S)
        return self._finish([self._resize(img, nh, nw)], crop=True)

    def _pad(self, img: Image.Image) -> torch.Tensor:
        # expand to square with the mean colour, then S x S (shortest-edge resize of a square == squash; crop no-op).
        S = self.image_size
        h, w = img.height, img.width
        side = max(h, w)
        if self.backend == "pil":
            sq = expand_to_square(img, self.background)
            return self._finish([self._resize(sq, S, S)])
        canvas = torch.empty((1, side, side, 3), dtype=torch.uint8)
        canvas[:] = torch.tensor(self.background, dtype=torch.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[0, top : top + h, left : left + w] = _hwc(img)
        return self._finish([_interp_u8(canvas.permute(0, 3, 1, 2), S, S)])

    def _anyres(self, img: Image.Image) -> torch.Tensor:
        S = self.image_size
        h, w = img.height, img.width
        bh, bw = _ar.select_best_resolution((h, w), self.spec)
        if bh % S or bw % S:  # the reference would resize partial edge tiles; no released config has them
            raise ValueError(f"grid pinpoint {bh}x{bw} is not a multiple of the tile size {S}")
        nh, nw, top, left = _ar.resize_and_pad_geometry((h, w), (bh, bw))
        gh, gw = bh // S, bw // S
        out = torch.empty((1 + gh * gw, 3, S, S), dtype=torch.float32)

        def base_view():  # the whole image squashed to S x S
            self._normalize_into(self._u8(self._resize(img, S, S)), out[:1])

        pool = _helper_pool() if (self.parallel_resize and self.backend == "pil") else None
        fut = pool.submit(base_view) if pool is not None else None
        resized = self._resize(img, nh, nw)
        canvas = torch.zeros((3, bh, bw), dtype=torch.uint8)  # black letterbox, planar
        if isinstance(resized, Image.Image):  # per-band row copies beat an HWC -> CHW transpose
            for c, band in enumerate(resized.split()):
                canvas[c, top : top + nh, left : left + nw] = _hwc(band)
        else:
            canvas[:, top : top + nh, left : left + nw] = resized[0]
        tiles = canvas.view(3, gh, S, gw, S).permute(1, 3, 0, 2, 4)  # [gh, gw, 3, S, S] row-major tiles, no copy
        self._normalize_into(tiles, out[1:].view(gh, gw, 3, S, S))
        if fut is not None:
            fut.result()
        else:
            base_view()
        return out

    # ------------------------------------------------------------------ backend primitives
    def _resize(self, img: Image.Image, h: int, w: int):
        """PIL backend -> PIL image; fast backend -> uint8 [1, 3, h, w] tensor (torchvision ``resize`` semantics)."""
        if self.backend == "pil":
            if (img.height, img.width) == (h, w):
                return img
            return img.resize((w, h), _BICUBIC)
        return _interp_u8(_hwc(img).permute(2, 0, 1)[None], h, w)

    @staticmethod
    def _u8(v) -> torch.Tensor:
        """PIL image -> [1, 3, H, W] uint8 view of its pixels; tensors pass through."""
        return _hwc(v).permute(2, 0, 1)[None] if isinstance(v, Image.Image) else v

    def _normalize_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """uint8 ``src`` -> normalized float32 written to ``dst`` (same shape, channel dim at -3)."""
        if self._scale is not None:  # PIL twin: f32(x / 255) - mean, / std
            torch.div(src, self._scale, out=dst)
            dst.sub_(self._m)
        else:  # torchvision twin: (f32(x) - 255*mean) / (255*std)
            torch.sub(src, self._m, out=dst)
        dst.div_(self._s)

    def _finish(self, views: list, crop: bool = False) -> torch.Tensor:
        """uint8 views (PIL images or [n,3,h,w] tensors) -> normalized float32 [N, 3, S, S], centre-cropped if asked."""
        S = self.image_size
        tensors = []
        for v in views:
            t = self._u8(v)
            if crop:
                th, tw = t.shape[-2:]
                y, x = int((th - S) / 2.0), int((tw - S) / 2.0)
                t = t[..., y : y + S, x : x + S]
            if t.shape[-2:] != (S, S):
                raise ValueError(f"view of size {tuple(t.shape[-2:])} does not match image_size {S}")
            tensors.append(t)
        out = torch.empty((sum(t.shape[0] for t in tensors), 3, S, S), dtype=torch.float32)
        i = 0
        for t in tensors:
            self._normalize_into(t, out[i : i + t.shape[0]])
            i += t.shape[0]
        return out


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _helper_pool() -> ThreadPoolExecutor | None:
    """One helper thread per process (re-created after fork, e.g. in DataLoader workers); None on a single CPU."""
    global _POOL
    pid = os.getpid()
    if _POOL is None or _POOL[0] != pid:
        try:
            ncpu = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            ncpu = os.cpu_count() or 1
        if ncpu < 2:
            return None
        _POOL = (pid, ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmkit-resize"))
    return _POOL[1]


def _hwc(img: Image.Image) -> torch.Tensor:
    """HWC (HW for one band) uint8 tensor over a copy of a PIL image's pixels (read-only buffer; never written to)."""
    arr = np.asarray(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _interp_u8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision ``resize`` (BICUBIC, antialias=True) of a uint8 [N, 3, H, W] tensor: native uint8 kernel on CPU,
    same size returns the input."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
