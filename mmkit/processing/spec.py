"""``AnyResSpec``: one model's image parameters (how an image becomes encoder views and LLM rows) as a frozen value.

It is derived once, when a model is built or loaded, from the recipe's ``model.image`` (``mmkit.recipe.ImageConfig``)
and the encoder's input size (:meth:`AnyResSpec.from_config`); the model keeps it as ``model.image_spec``, the
processor and the connector's packing (``mmkit.connectors.anyres``) take it, and so does every AnyRes function of
``mmkit.processing.anyres``. The recipe stays what is saved: the spec is never written back into it. It is frozen and
hashable, so equal parameters give equal specs that can key caches. Square and pad images are the one-view case
(``aspect_ratio`` ``"square"`` / ``"pad"``).

**Pinpoint order.** A config's ``image_grid_pinpoints`` is read as ``[h, w]`` pairs by transformers and as ``[w, h]``
pairs by the original LLaVA code (haotian-liu/LLaVA ``mm_utils.select_best_resolution`` gets ``image.size == (W, H)``).
:meth:`AnyResSpec.create` and :meth:`AnyResSpec.from_config` take the pairs as stored and resolve that once:
``pinpoints_hw`` always holds ``(h, w)`` pairs, in the stored candidate order (the order decides ties in
``select_best_resolution``, whose arithmetic is symmetric in the two axes), so no code downstream flips pairs. The
direct constructor takes ``pinpoints_hw`` already as ``(h, w)``. ``convention`` stays in the spec for what still
differs after that: the unpad rounding (``int`` vs ``int(round(x, 7))``) and the RGBA conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmkit.processing.anyres import CONVENTIONS, MERGES, parse_anyres_max, parse_grid_pinpoints

__all__ = [
    "ASPECT_RATIOS",
    "BACKENDS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "AnyResSpec",
    "SpecError",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ASPECT_RATIOS = ("square", "pad", "anyres")
BACKENDS = ("pil", "fast")

# spec field -> the ImageConfig field it comes from, for error messages that name the recipe key
_CONFIG_FIELDS = {"pinpoints_hw": "grid_pinpoints"}


class SpecError(ValueError):
    """A bad image parameter; the message names the field (``AnyResSpec.merge: ...`` or ``model.image.merge: ...``)."""

    def __init__(self, field: str, detail: str, where: str = "AnyResSpec."):
        self.field, self.detail = field, detail
        super().__init__(f"{where}{field}: {detail}")


def _one_of(field: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SpecError(field, f"must be one of {tuple(choices)}, got {value!r}")


def _floats3(field: str, values) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise SpecError(field, f"expected 3 numbers (RGB), got {values!r}") from None
    if len(out) != 3:
        raise SpecError(field, f"expected 3 numbers (RGB), got {len(out)}")
    return out


@dataclass(frozen=True)
class AnyResSpec:
    """Image parameters of one model. Build it with :meth:`from_config` (a recipe) or :meth:`create` (pinpoints as
    stored); the constructor takes ``pinpoints_hw`` as ``(h, w)`` pairs.

    Attributes:
        image_size: encoder input size S, also the AnyRes tile size (336 for CLIP-L/14-336, 384 for SigLIP-384).
        aspect_ratio: ``"square"``, ``"pad"`` or ``"anyres"`` (OneVision's ``anyres_max_N`` is ``"anyres"`` with
            ``anyres_max=N``).
        pinpoints_hw: AnyRes canvas candidates as ``(h, w)``, in the config's order.
        convention: ``"hf"`` or ``"orig"``: unpad rounding and RGBA handling of that reference.
        anyres_max: OneVision's N (bilinear downscale of oversized feature grids), or None.
        merge: ``"flat"``, ``"spatial"`` or ``"spatial_unpad"`` (see ``mmkit.connectors.anyres.pack_image_features``).
        newline: whether the model has an ``image_newline`` (one extra row per grid row / single view / video).
        mean, std: per-channel normalisation.
        backend: ``"pil"`` or ``"fast"`` preprocessing (see ``mmkit.processing.image``).
    """

    image_size: int
    aspect_ratio: str = "pad"
    pinpoints_hw: tuple[tuple[int, int], ...] = ()
    convention: str = "hf"
    anyres_max: int | None = None
    merge: str = "flat"
    newline: bool = False
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    backend: str = "pil"

    def __post_init__(self):
        # normalise container and number types, so that equal parameters compare and hash equal
        try:
            size = int(self.image_size)
        except (TypeError, ValueError):
            raise SpecError("image_size", f"expected a positive int, got {self.image_size!r}") from None
        if size <= 0:
            raise SpecError("image_size", f"expected a positive int, got {self.image_size!r}")
        pins = []
        for pair in self.pinpoints_hw:
            if len(pair) != 2:
                raise SpecError("pinpoints_hw", f"expected (h, w) pairs, got {pair!r}")
            pins.append((int(pair[0]), int(pair[1])))
        _one_of("aspect_ratio", self.aspect_ratio, ASPECT_RATIOS)
        _one_of("convention", self.convention, CONVENTIONS)
        _one_of("merge", self.merge, MERGES)
        _one_of("backend", self.backend, BACKENDS)
        if self.aspect_ratio == "anyres" and not pins:
            raise SpecError("pinpoints_hw", "aspect_ratio 'anyres' needs grid pinpoints")
        if self.anyres_max is not None and (isinstance(self.anyres_max, bool) or not isinstance(self.anyres_max, int)
                                            or self.anyres_max <= 0):
            raise SpecError("anyres_max", f"expected a positive int or None, got {self.anyres_max!r}")
        set_ = object.__setattr__
        set_(self, "image_size", size)
        set_(self, "pinpoints_hw", tuple(pins))
        set_(self, "newline", bool(self.newline))
        set_(self, "mean", _floats3("mean", self.mean))
        set_(self, "std", _floats3("std", self.std))

    @classmethod
    def create(
        cls,
        image_size: int,
        aspect_ratio: str = "pad",
        grid_pinpoints=None,
        convention: str = "hf",
        anyres_max: int | str | None = None,
        merge: str | None = None,
        newline: bool | None = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        backend: str = "pil",
    ) -> AnyResSpec:
        """A spec from parameters as a config stores them.

        ``grid_pinpoints`` is in the convention's pair order (``[h, w]`` for "hf", ``[w, h]`` for "orig"), in any form
        ``parse_grid_pinpoints`` reads (list, its string literal, ``"(1x1),...,(6x6)"``); None or empty = none.
        ``aspect_ratio`` may be ``"anyres_max_N"``; ``anyres_max`` may be ``N`` or ``"anyres_max_N"``. ``merge``
        defaults to ``"spatial_unpad"`` for AnyRes and ``"flat"`` otherwise; ``newline`` to ``merge ==
        "spatial_unpad"`` (a model has an ``image_newline`` exactly then).
        """
        if isinstance(aspect_ratio, str) and aspect_ratio.startswith("anyres_max_"):
            if anyres_max is None:
                anyres_max = aspect_ratio
            aspect_ratio = "anyres"
        _one_of("convention", convention, CONVENTIONS)  # needed to read the pairs
        try:
            anyres_max = parse_anyres_max(anyres_max)
        except ValueError as exc:
            raise SpecError("anyres_max", str(exc)) from None
        pins_hw: tuple = ()
        if grid_pinpoints is not None and (isinstance(grid_pinpoints, str) or len(grid_pinpoints)):
            try:
                pairs = parse_grid_pinpoints(grid_pinpoints, int(image_size))
            except (TypeError, ValueError) as exc:
                raise SpecError("grid_pinpoints", str(exc)) from None
            pins_hw = tuple((a, b) if convention == "hf" else (b, a) for a, b in pairs)
        elif aspect_ratio == "anyres":
            raise SpecError("grid_pinpoints", "aspect_ratio 'anyres' needs grid pinpoints")
        if merge is None:
            merge = "spatial_unpad" if aspect_ratio == "anyres" else "flat"
        if newline is None:
            newline = merge == "spatial_unpad"
        return cls(image_size, aspect_ratio, pins_hw, convention, anyres_max, merge, newline, tuple(mean), tuple(std),
                   backend)

    @classmethod
    def from_config(cls, image, vision_image_size: int, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> AnyResSpec:
        """The spec of a model whose recipe has ``model.image = image`` (an ``ImageConfig``) and whose encoder takes
        ``vision_image_size`` pixels; ``mean``/``std`` are the encoder's, used where the recipe has none. The model has
        an ``image_newline`` exactly when ``image.merge == "spatial_unpad"``. Errors name the recipe key
        (``model.image.grid_pinpoints: ...``)."""
        try:
            return cls.create(
                image.image_size or vision_image_size,
                aspect_ratio=image.aspect_ratio,
                grid_pinpoints=image.grid_pinpoints,
                convention=image.convention,
                anyres_max=image.anyres_max,
                merge=image.merge,
                newline=image.merge == "spatial_unpad",
                mean=image.mean or mean or OPENAI_CLIP_MEAN,
                std=image.std or std or OPENAI_CLIP_STD,
                backend=image.backend,
            )
        except SpecError as exc:
            raise SpecError(_CONFIG_FIELDS.get(exc.field, exc.field), exc.detail, where="model.image.") from None
