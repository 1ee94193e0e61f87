"""AnyRes geometry, token counts and feature packing vs transformers (oracle) and the spec's worked examples.

Oracles: ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor`` token counts (built offline from explicit settings and a
tiny in-memory tokenizer), ``transformers.image_processing_utils.select_best_resolution``, the modeling helpers
``get_anyres_image_grid_shape`` / ``image_size_to_num_patches`` and ``LlavaNextModel.pack_image_features`` /
``LlavaOnevisionModel.pack_image_features`` / ``apply_pooling`` called with a stand-in ``self`` that carries the config.
The 'orig' convention is checked against the spec's numbers and a literal transcription of the original repo's
functions (haotian-liu/LLaVA ``mm_utils.py`` / ``llava_arch.py``; the repo itself is not installed here).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov

from mmkit.connectors.anyres import (
    pack_image_features,
    pack_image_features_batch,
    pack_video_features,
    pool_video_features,
)
from mmkit.processing import anyres as ar
from mmkit.processing.image import ImageProcessor
from mmkit.processing.spec import AnyResSpec

NEXT = ar.LLAVA_NEXT_PINPOINTS
OV = ar.ONEVISION_PINPOINTS


def spec(pins, tile, convention="hf", anyres_max=None, merge="spatial_unpad", newline=True) -> AnyResSpec:
    """An AnyRes spec from pinpoints as stored (read per ``convention``)."""
    return AnyResSpec.create(tile, "anyres", pins, convention, anyres_max, merge, newline)


# ----------------------------------------------------------------------------- size grid (h, w)
def _size_grid() -> list[tuple[int, int]]:
    rnd = random.Random(1234)
    sizes = {(480, 640), (640, 480), (1000, 1000), (899, 1024), (200, 800), (1080, 1920), (1024, 1024), (200, 300)}
    sizes |= {(53, 50), (352, 110), (423, 94), (336, 336), (384, 384), (672, 672), (336, 672), (672, 336)}
    sizes |= {(1, 1), (1, 500), (500, 1), (20, 25), (25, 20), (337, 335), (2048, 2048), (4000, 300), (300, 4000)}
    while len(sizes) < 150:  # log-uniform sizes, 16..2500 px, all aspect ratios
        sizes.add((int(math.exp(rnd.uniform(math.log(16), math.log(2500)))), int(math.exp(rnd.uniform(2.77, 7.82)))))
    while len(sizes) < 230:  # small images (both sides <= 336): where the tie-breaks differ
        sizes.add((rnd.randint(10, 336), rnd.randint(10, 336)))
    return sorted(sizes)


SIZES = _size_grid()


# ----------------------------------------------------------------------------- offline HF processors
@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<unk>": 0, "<image>": 1, "<video>": 2, "hello": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


@pytest.fixture(scope="module")
def next_proc(tokenizer):
    ip = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=NEXT
    )
    return LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def ov_proc(tokenizer):
    ip = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=OV
    )
    vp = LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaOnevisionProcessor(
        image_processor=ip,
        video_processor=vp,
        tokenizer=tokenizer,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def _fake_model(tile: int, pinpoints) -> SimpleNamespace:
    cfg = SimpleNamespace(vision_config=SimpleNamespace(image_size=tile, patch_size=14), image_grid_pinpoints=pinpoints)
    return SimpleNamespace(config=cfg)


# ----------------------------------------------------------------------------- worked examples (spec 3.5-3.7)
@pytest.mark.parametrize(
    "wh,expected",
    [((640, 480), 2340), ((480, 640), 2352), ((1000, 1000), 2928), ((1024, 899), 2634), ((800, 200), 1890)],
)
def test_llava_next_worked_examples(wh, expected):
    w, h = wh
    assert ar.anyres_num_tokens((h, w), spec(NEXT, 336, "hf"), 24) == expected
    assert ImageProcessor.llava_next().num_image_tokens((h, w), 24) == expected


@pytest.mark.parametrize(
    "wh,expected", [((640, 480), 2929), ((1920, 1080), 7269), ((1024, 1024), 7371), ((300, 200), 1261)]
)
def test_onevision_worked_examples(wh, expected):
    w, h = wh
    assert ar.anyres_num_tokens((h, w), spec(OV, 384, "hf", anyres_max=9), 27) == expected
    assert ImageProcessor.onevision().num_image_tokens((h, w), 27) == expected


def test_worked_example_geometry():
    lay = ar.anyres_layout((480, 640), spec(NEXT, 336), 24)
    assert lay.best_hw == (672, 672) and lay.grid == (2, 2) and lay.num_views == 5
    assert lay.resized_hw == (504, 672) and lay.paste_yx == (84, 0)
    assert lay.feature_hw == (48, 48) and lay.unpadded_hw == (36, 48)
    lay = ar.anyres_layout((200, 800), spec(NEXT, 336), 24)
    assert lay.grid == (1, 3) and lay.unpadded_hw == (18, 72)
    lay = ar.anyres_layout((480, 640), spec(OV, 384, anyres_max=9), 27)
    assert lay.best_hw == (768, 768) and lay.resized_hw == (576, 768) and lay.unpadded_hw == (40, 54)
    assert lay.final_hw == (40, 54)  # ratio 0.574: no downscale
    lay = ar.anyres_layout((1080, 1920), spec(OV, 384, anyres_max="anyres_max_9"), 27)
    assert lay.grid == (3, 5) and lay.num_views == 16 and lay.unpadded_hw == (75, 135) and lay.final_hw == (60, 108)
    lay = ar.anyres_layout((200, 300), spec(OV, 384, anyres_max=9), 27)
    assert lay.grid == (1, 1) and lay.num_views == 2 and lay.final_hw == (19, 27)


@pytest.mark.parametrize(
    "wh,pins,tile,P,amax,orig,hf",
    [
        ((50, 53), NEXT, 336, 24, None, 1226, 1128),  # small image: tie-break (3.6.1)
        ((110, 352), NEXT, 336, 24, None, 1296, 1392),  # int() vs int(round(., 7)) (3.6.2)
        ((94, 423), OV, 384, 27, 9, 1377, 1485),
        ((300, 300), NEXT, 336, 24, None, 1176, 1176),  # same count, different layout
    ],
)
def test_orig_vs_hf_examples(wh, pins, tile, P, amax, orig, hf):
    w, h = wh
    assert ar.anyres_num_tokens((h, w), spec(pins, tile, "orig", anyres_max=amax), P) == orig
    assert ar.anyres_num_tokens((h, w), spec(pins, tile, "hf", anyres_max=amax), P) == hf


def test_small_image_layouts_differ():
    # both sides <= 336: every llava-v1.6 candidate caps eff at W*H; first of the 336x672-area entries wins
    assert ar.grid_shape((300, 300), spec(NEXT, 336, "hf")) == (1, 2)  # [336, 672] read as h=336, w=672
    assert ar.grid_shape((300, 300), spec(NEXT, 336, "orig")) == (2, 1)  # [336, 672] read as w=336, h=672
    assert ar.select_best_resolution((53, 50), spec(NEXT, 336, "orig")) == (672, 336)


# ----------------------------------------------------------------------------- vs transformers on the size grid
def test_select_best_resolution_and_grid_match_hf():
    next_hf, ov_hf, next_orig = spec(NEXT, 336, "hf"), spec(OV, 384, "hf"), spec(NEXT, 336, "orig")
    for hw in SIZES:
        assert ar.select_best_resolution(hw, next_hf) == tuple(hf_select_best_resolution(hw, NEXT)), hw
        assert ar.select_best_resolution(hw, ov_hf) == tuple(hf_select_best_resolution(hw, OV)), hw
        assert ar.grid_shape(hw, next_hf) == tuple(hf_next.get_anyres_image_grid_shape(hw, NEXT, 336)), hw
        assert ar.grid_shape(hw, ov_hf) == tuple(hf_ov.get_anyres_image_grid_shape(hw, OV, 384)), hw
        assert ar.num_views(hw, next_hf) == hf_next.image_size_to_num_patches(hw, NEXT, 336), hw
        assert ar.num_views(hw, ov_hf) == hf_ov.image_size_to_num_patches(hw, OV, 384), hw
        # orig reads each pair as [w, h]: same as HF on the transposed list
        transposed = [[b, a] for a, b in NEXT]
        assert ar.select_best_resolution(hw, next_orig) == tuple(hf_select_best_resolution(hw, transposed)), hw


def test_token_counts_match_hf_processors(next_proc, ov_proc):
    assert len(SIZES) >= 200
    hf_next_counts = next_proc._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    hf_ov_counts = ov_proc._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    ip_next, ip_ov = ImageProcessor.llava_next(), ImageProcessor.onevision()
    for hw, n_next, n_ov in zip(SIZES, hf_next_counts, hf_ov_counts):
        assert ar.anyres_num_tokens(hw, spec(NEXT, 336, "hf"), 24) == n_next, hw
        assert ip_next.num_image_tokens(hw, 24) == n_next, hw
        assert ar.anyres_num_tokens(hw, spec(OV, 384, "hf", anyres_max=9), 27) == n_ov, hw
        assert ip_ov.num_image_tokens(hw, 27) == n_ov, hw


def test_end_to_end_processor_token_counts(next_proc, ov_proc):
    """Full HF processor calls (pixels + prompt expansion) agree with mmkit's views and counts."""
    rng = np.random.default_rng(0)
    ip_next, ip_ov = ImageProcessor.llava_next(), ImageProcessor.onevision()
    for w, h in [(640, 480), (50, 53), (1000, 200)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = next_proc(images=[im], text=["<image> hello"], return_tensors="pt")
        assert int((out["input_ids"] == 1).sum()) == ip_next.num_image_tokens((h, w), 24)
        assert out["pixel_values"].shape[1] == ip_next.num_views((h, w)) == ip_next.preprocess(im).shape[0]
        out = ov_proc(images=[im], text=["<image> hello"], return_tensors="pt")
        assert int((out["input_ids"] == 1).sum()) == ip_ov.num_image_tokens((h, w), 27)
        assert out["pixel_values"].shape[1] == ip_ov.num_views((h, w))
    # OneVision multi-image sample: each image is one padded view + newline = 730 tokens
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(640, 480), (300, 200)]]
    out = ov_proc(images=[ims], text=["<image> <image> hello"], return_tensors="pt")
    assert int((out["input_ids"] == 1).sum()) == 2 * ar.multi_image_num_tokens(27) == 1460
    assert all(ip_ov.num_image_tokens((im.height, im.width), 27, multi_image=True) == 730 for im in ims)
    assert ip_ov(ims, multi_image=True)["pixel_values"][0].shape == (1, 3, 384, 384)
    # video: frames * 14 * 14 + 1 newline
    vid = rng.integers(0, 256, (4, 300, 400, 3), dtype=np.uint8)
    out = ov_proc(videos=[vid], text=["<video> hello"], return_tensors="pt")
    assert int((out["input_ids"] == 2).sum()) == ar.video_num_tokens(4, 27) == ip_ov.num_video_tokens(4, 27) == 785
    assert ov_proc._get_num_multimodal_tokens(video_sizes=[(8, 384, 384)]).num_video_tokens == [
        ar.video_num_tokens(8, 27)
    ]


# ----------------------------------------------------------------------------- packing vs transformers
def _random_views(n_views: int, P: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_views, P * P, D, generator=g)


def test_pack_image_features_matches_llava_next():
    fake = _fake_model(336, NEXT)
    newline = torch.randn(6)
    next_hf = spec(NEXT, 336, "hf")
    for i, hw in enumerate(SIZES):
        feats = _random_views(ar.num_views(hw, next_hf), 24, 6, i)
        (ref,), lens = hf_next.LlavaNextModel.pack_image_features(
            fake, [feats], torch.tensor([hw]), "default", image_newline=newline
        )
        got = pack_image_features(feats, hw, next_hf, newline)
        assert got.shape == ref.shape and torch.equal(got, ref), hw
        assert got.shape[0] == ar.anyres_num_tokens(hw, next_hf, 24)
    # without newline (HF allows image_newline=None)
    hw = (480, 640)
    feats = _random_views(5, 24, 6, 0)
    (ref,), _ = hf_next.LlavaNextModel.pack_image_features(fake, [feats], torch.tensor([hw]), "default", None)
    no_newline = spec(NEXT, 336, newline=False)
    got = pack_image_features(feats, hw, no_newline, None)
    assert torch.equal(got, ref) and got.shape[0] == ar.anyres_num_tokens(hw, no_newline, 24)


def test_pack_image_features_matches_onevision():
    fake = _fake_model(384, OV)
    newline = torch.randn(5)
    ov9 = spec(OV, 384, "hf", anyres_max=9)
    for i, hw in enumerate(SIZES[::2]):
        feats = _random_views(ar.num_views(hw, ov9), 27, 5, i)
        (ref,), _ = hf_ov.LlavaOnevisionModel.pack_image_features(
            fake, [feats], torch.tensor([hw]), image_newline=newline, vision_aspect_ratio="anyres_max_9"
        )
        got = pack_image_features(feats, hw, ov9, newline)
        assert got.shape == ref.shape and torch.equal(got, ref), hw
        assert got.shape[0] == ar.anyres_num_tokens(hw, ov9, 27)
    # single view (multi-image entry): features + newline
    feats = _random_views(1, 27, 5, 0)
    (ref,), _ = hf_ov.LlavaOnevisionModel.pack_image_features(fake, [feats], torch.tensor([[10, 10]]), newline)
    got = pack_image_features(feats, (10, 10), spec(OV, 384), newline)
    assert torch.equal(got, ref) and got.shape[0] == ar.multi_image_num_tokens(27)


def test_pack_batch_and_video_pooling():
    newline = torch.randn(4)
    sizes = [(480, 640), (53, 50), (1080, 1920)]
    per_image = [_random_views(ar.num_views(hw, spec(OV, 384)), 27, 4, i) for i, hw in enumerate(sizes)]
    packed, lens = pack_image_features_batch(torch.cat(per_image), sizes, spec(OV, 384, anyres_max=9), newline)
    fake = _fake_model(384, OV)
    refs, ref_lens = hf_ov.LlavaOnevisionModel.pack_image_features(fake, per_image, torch.tensor(sizes), newline)
    assert lens == ref_lens.tolist() and all(torch.equal(a, b) for a, b in zip(packed, refs))
    # multi-image: one view per image
    packed, lens = pack_image_features_batch(
        torch.randn(2, 729, 4), sizes[:2], spec(OV, 384), newline, views_per_image=[1, 1]
    )
    assert lens == [730, 730]
    # video: apply_pooling (27x27 -> 14x14 bilinear) + one newline after the video
    frames = torch.randn(3, 729, 4)
    ref = hf_ov.LlavaOnevisionModel.apply_pooling(fake, frames)
    assert torch.equal(pool_video_features(frames), ref) and ref.shape == (3, 196, 4)
    vid = pack_video_features(frames, newline)
    assert torch.equal(vid, torch.cat([ref.reshape(-1, 4), newline[None]]))
    assert vid.shape[0] == ar.video_num_tokens(3, 27)


def test_flat_and_spatial_merges():
    hw = (480, 640)
    feats = _random_views(5, 24, 3, 7)
    flat = pack_image_features(feats, hw, spec(NEXT, 336, merge="flat"), None)
    assert torch.equal(flat, feats.flatten(0, 1))
    assert flat.shape[0] == ar.anyres_num_tokens(hw, spec(NEXT, 336, merge="flat"), 24)
    sp = pack_image_features(feats, hw, spec(NEXT, 336, merge="spatial"), None)
    assert sp.shape[0] == ar.anyres_num_tokens(hw, spec(NEXT, 336, merge="spatial"), 24) == 5 * 576
    grid = feats[1:].view(2, 2, 24, 24, 3)  # (row, col, y, x): second output row of tiles starts after 48 grid rows
    assert torch.equal(sp[576 : 576 + 24], grid[0, 0, 0]) and torch.equal(sp[576 + 24 : 576 + 48], grid[0, 1, 0])
    one = _random_views(1, 24, 3, 1)
    assert pack_image_features(one, hw, spec(NEXT, 336), torch.ones(3)).shape[0] == 577
    assert ar.single_view_num_tokens(spec(NEXT, 336), 24) == 577
    assert ar.single_view_num_tokens(AnyResSpec(336), 24) == 576  # flat merge
    with pytest.raises(ValueError, match="needs 5 views"):
        pack_image_features(_random_views(4, 24, 3, 0), hw, spec(NEXT, 336, newline=False), None)  # wrong view count


# ----------------------------------------------------------------------------- 'orig' convention
def _orig_select_best_resolution(original_size, possible_resolutions):  # mm_utils.py, transcribed
    original_width, original_height = original_size
    best_fit, max_eff, min_waste = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        dw, dh = int(original_width * scale), int(original_height * scale)
        eff = min(dw * dh, original_width * original_height)
        waste = width * height - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best_fit = eff, waste, (width, height)
    return best_fit


def _orig_unpad_image(tensor, original_size):  # llava_arch.py, transcribed
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def _orig_pack(image_feature, image_size_wh, pinpoints, tile, newline, max_num=None):  # llava_arch 'spatial_unpad'
    base, image_feature = image_feature[0], image_feature[1:]
    height = width = math.isqrt(base.shape[0])
    bw, bh = _orig_select_best_resolution(image_size_wh, pinpoints)
    num_patch_width, num_patch_height = bw // tile, bh // tile
    image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    image_feature = _orig_unpad_image(image_feature, image_size_wh)
    if max_num is not None:
        c, h, w = image_feature.shape
        times = math.sqrt(h * w / (max_num * height**2))
        if times > 1.1:
            image_feature = torch.nn.functional.interpolate(
                image_feature[None], [int(h // times), int(w // times)], mode="bilinear"
            )[0]
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    return torch.cat((base, image_feature.flatten(1, 2).transpose(0, 1)), dim=0)


def test_orig_convention_matches_transcribed_reference():
    newline = torch.randn(3)
    n_diff = 0
    for i, (h, w) in enumerate(SIZES):
        for pins, tile, P, amax in [(NEXT, 336, 24, None), (OV, 384, 27, 9)]:
            orig, hf = spec(pins, tile, "orig", anyres_max=amax), spec(pins, tile, "hf", anyres_max=amax)
            bw, bh = _orig_select_best_resolution((w, h), pins)
            assert ar.select_best_resolution((h, w), orig) == (bh, bw)
            n = 1 + (bh // tile) * (bw // tile)
            feats = _random_views(n, P, 3, i)
            ref = _orig_pack(feats, (w, h), pins, tile, newline, amax)
            got = pack_image_features(feats, (h, w), orig, newline)
            assert torch.equal(got, ref), (h, w, tile)
            assert ar.anyres_num_tokens((h, w), orig, P) == ref.shape[0]
            n_diff += ar.anyres_num_tokens((h, w), hf, P) != ref.shape[0]
    assert n_diff > 0  # the grid does exercise the divergences


def test_unpad_rounding():
    # 110 * (48 / 352) == 14.999999999999998: orig truncates to 14 cols, HF rounds to 15 -> keeps 16 (odd padding)
    assert ar.unpadded_grid_shape((48, 24), (352, 110), "orig") == (48, 14)
    assert ar.unpadded_grid_shape((48, 24), (352, 110), "hf") == (48, 16)


# ----------------------------------------------------------------------------- misc helpers
def test_parse_grid_pinpoints_and_anyres_max():
    assert ar.parse_grid_pinpoints("(1x1),...,(6x6)", 384) == OV
    assert ar.parse_grid_pinpoints("[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]") == NEXT
    assert ar.parse_grid_pinpoints([(336, 672)]) == [[336, 672]]
    assert ar.parse_anyres_max("anyres_max_9") == 9 and ar.parse_anyres_max(None) is None
    assert ar.parse_anyres_max("anyres") is None and ar.parse_anyres_max(4) == 4
    ip = ImageProcessor(AnyResSpec.create(384, aspect_ratio="anyres_max_9", grid_pinpoints="(1x1),...,(6x6)"))
    assert ip.aspect_ratio == "anyres" and ip.anyres_max == 9 and ip.spec.pinpoints_hw == tuple(map(tuple, OV))
    with pytest.raises(ValueError):
        AnyResSpec.create(336, "anyres", NEXT, "llava")  # unknown convention
    assert ar.divide_to_tiles((672, 1008), 336) == [(0, 0), (0, 336), (0, 672), (336, 0), (336, 336), (336, 672)]
    assert ar.resize_and_pad_geometry((480, 640), (672, 672)) == (504, 672, 84, 0)
    assert ar.video_pooled_side(27) == 14 and ar.video_pooled_side(24) == 12
