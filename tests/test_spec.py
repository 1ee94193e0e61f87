"""AnyResSpec: the pinpoint order is resolved once, specs are frozen values, and a built model keeps the one it derived
from its recipe (the recipe itself is left as stored)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

import mmkit
from mmkit.processing import anyres as ar
from mmkit.processing.spec import AnyResSpec, SpecError
from mmkit.recipe import ImageConfig

NEXT = ar.LLAVA_NEXT_PINPOINTS  # stored [h, w] by transformers; the same list read as [w, h] by the original repo


def test_pinpoint_order_is_resolved_at_construction():
    hf = AnyResSpec.create(336, "anyres", NEXT, "hf")
    orig = AnyResSpec.create(336, "anyres", NEXT, "orig")
    assert hf.pinpoints_hw == tuple(tuple(p) for p in NEXT)
    assert orig.pinpoints_hw == tuple((w_h[1], w_h[0]) for w_h in NEXT)  # (h, w), candidate order kept
    # after that the convention no longer matters to the canvas choice: orig == hf on the transposed list
    transposed = AnyResSpec.create(336, "anyres", [[b, a] for a, b in NEXT], "hf")
    assert dataclasses.replace(orig, convention="hf") == transposed
    for hw in [(20, 25), (53, 50), (300, 300), (480, 640), (1000, 200)]:
        assert ar.select_best_resolution(hw, orig) == ar.select_best_resolution(hw, transposed)
    # the symmetric range form gives the same candidates either way, in the order of the reading
    ov = {c: AnyResSpec.create(384, "anyres", "(1x1),...,(6x6)", c).pinpoints_hw for c in ("hf", "orig")}
    assert set(ov["hf"]) == set(ov["orig"]) and ov["hf"] == tuple(map(tuple, ar.ONEVISION_PINPOINTS))
    ov_orig = AnyResSpec.create(384, "anyres", "(1x1),...,(2x3)", "orig")
    assert ov_orig.pinpoints_hw[:3] == ((384, 384), (768, 384), (1152, 384))  # stored (w, h) = (384*i, 384*j)


def test_equal_specs_hash_equal_and_are_frozen():
    a = AnyResSpec.create(336, "anyres", NEXT, anyres_max="anyres_max_9", mean=[0.5, 0.5, 0.5], std=[0.5] * 3)
    b = AnyResSpec.create(336, "anyres_max_9", tuple(map(tuple, NEXT)), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert a == b and hash(a) == hash(b) and {a: "cached"}[b] == "cached"
    assert (a.merge, a.newline, a.anyres_max) == ("spatial_unpad", True, 9)  # AnyRes defaults
    assert a != dataclasses.replace(a, convention="orig")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.merge = "flat"
    assert isinstance(a.pinpoints_hw, tuple) and all(isinstance(p, tuple) for p in a.pinpoints_hw)


def test_from_config_and_errors_name_the_recipe_key():
    cfg = ImageConfig(aspect_ratio="anyres", grid_pinpoints=[[56, 112], [112, 56]], merge="spatial_unpad",
                      convention="orig", anyres_max=4)
    spec = AnyResSpec.from_config(cfg, 56, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    assert spec == AnyResSpec(56, "anyres", ((112, 56), (56, 112)), "orig", 4, "spatial_unpad", True,
                              (0.1, 0.2, 0.3), (1.0, 1.0, 1.0), "fast")
    assert cfg.grid_pinpoints == [[56, 112], [112, 56]]  # the config is not touched
    assert AnyResSpec.from_config(ImageConfig(), 224).newline is False  # flat merge: no image_newline
    with pytest.raises(SpecError, match=r"model\.image\.grid_pinpoints: aspect_ratio 'anyres' needs grid pinpoints"):
        AnyResSpec.from_config(ImageConfig(aspect_ratio="anyres", merge="spatial_unpad"), 336)
    with pytest.raises(ValueError, match=r"AnyResSpec\.merge: must be one of"):
        AnyResSpec(336, merge="spatial_pad")


def test_model_keeps_the_spec_and_the_recipe_stays_as_stored():
    pins = [[32, 64], [64, 32]]
    model = mmkit.build("recipes/tiny.yaml", [
        "model.image.aspect_ratio=anyres", f"model.image.grid_pinpoints={pins}", "model.image.convention=orig",
        "model.image.merge=spatial_unpad"]).eval()
    spec = model.image_spec
    assert spec.pinpoints_hw == ((64, 32), (32, 64)) and spec.convention == "orig" and spec.newline
    assert model.recipe.model.image.grid_pinpoints == pins  # saved as stored, never flipped
    assert model.processor.spec is spec and model.image_newline is not None
    # the processor's count and the model's packed rows agree for an image where (w, h) vs (h, w) matters
    im = Image.new("RGB", (20, 25), (200, 30, 30))  # W=20, H=25: orig picks the canvas (h, w) = (64, 32)
    pix = model.processor.process_images([im])
    assert ar.select_best_resolution((25, 20), spec) == (64, 32) and ar.grid_shape((25, 20), spec) == (2, 1)
    assert pix["pixel_values"][0].shape[0] == 3
    with torch.no_grad():
        rows = model.encode_images(pix["pixel_values"], pix["image_sizes"]).shape[0]
    assert rows == pix["num_tokens"][0]
