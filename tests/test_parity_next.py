"""LLaVA-NeXT and OneVision: transformers-written tiny models load in mmkit with equal logits (fp32, <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmkit
from tests.helpers import IMAGE_TOKEN, tiny_llava_next_hf, tiny_llava_onevision_hf

# (width, height): landscape, portrait, tall, wide, tiny, square, and sizes where conventions diverge
SIZES = [(640, 480), (480, 640), (60, 300), (300, 60), (10, 12), (56, 56), (50, 53), (110, 352), (94, 423), (33, 29)]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + w * 7 + h)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module", params=["next-llama-clip", "next-qwen2-siglip", "onevision"])
def pair(request, tmp_path_factory):
    if request.param == "onevision":
        hf = tiny_llava_onevision_hf()
    else:
        _, text, vision = request.param.split("-")
        hf = tiny_llava_next_hf(text, vision)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, mmkit.load(path).eval()


def hf_inputs(pix: dict):
    """mmkit's per-image views -> transformers' padded [B, max_views, 3, S, S] + image_sizes [B, 2]."""
    views = pix["pixel_values"]
    most = max(v.shape[0] for v in views)
    padded = torch.stack([torch.cat([v, v.new_zeros(most - v.shape[0], *v.shape[1:])]) for v in views])
    return padded, torch.tensor([list(hw) for hw in pix["image_sizes"]])


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_one_image_logits(pair, size):
    hf, ours = pair
    proc = ours.processor
    pix = proc.process_images([photo(*size)])
    n = pix["num_tokens"][0]
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9]])
    pixel_values, image_sizes = hf_inputs(pix)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        got = ours(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"]).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_batch_of_two_images_of_different_sizes(pair):
    hf, ours = pair
    one, two = (ours.processor.process_images([im]) for im in (photo(640, 480), photo(60, 300)))  # one per sample
    pix = {k: one[k] + two[k] for k in ("pixel_values", "image_sizes", "num_tokens")}
    a, b = pix["num_tokens"]
    rows = [[1, 5] + [IMAGE_TOKEN] * a + [7, 8], [1, 6] + [IMAGE_TOKEN] * b + [9]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    pixel_values, image_sizes = hf_inputs(pix)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pix["pixel_values"],
                   image_sizes=pix["image_sizes"]).logits
    assert (got - ref)[mask.bool()].abs().max().item() <= 1e-5


def test_loaded_recipe_says_what_it_is(pair):
    hf, ours = pair
    img = ours.recipe.model.image
    assert img.aspect_ratio == "anyres" and img.merge == "spatial_unpad" and img.convention == "hf"
    if hf.config.model_type == "llava_onevision":
        assert img.anyres_max == 2 and ours.vision.num_layers_used == len(ours.vision.blocks())


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    hf = tiny_llava_onevision_hf()
    path = tmp_path_factory.mktemp("ov")
    hf.save_pretrained(path)
    return hf, mmkit.load(path).eval()


def test_onevision_multi_image_sample(onevision):
    hf, ours = onevision
    pix = ours.processor.process_images([photo(640, 480), photo(60, 300)])
    assert [v.shape[0] for v in pix["pixel_values"]] == [1, 1]  # one base view per image, no tiles
    n = pix["num_tokens"]
    assert n == [4 + 1, 4 + 1]  # P*P + one newline each (P = 2 here; 729 + 1 at full size)
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * n[0] + [6] + [IMAGE_TOKEN] * n[1] + [7, 8]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=torch.stack(pix["pixel_values"]),
                 image_sizes=torch.tensor([list(hw) for hw in pix["image_sizes"]]),
                 batch_num_images=torch.tensor([2])).logits
        got = ours(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"]).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_onevision_video(onevision):
    hf, ours = onevision
    frames = [photo(64, 48, seed=s) for s in range(3)]
    vid = ours.processor.process_videos([frames])
    n = vid["num_tokens"][0]
    assert n == 3 * 1 + 1  # 3 frames x ceil(2/2)^2 pooled tokens + one newline after the video
    video_id = IMAGE_TOKEN + 1
    ids = torch.tensor([[1, 5] + [video_id] * n + [6, 7]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=torch.stack(vid["pixel_values_videos"])).logits
        got = ours(input_ids=ids, pixel_values_videos=vid["pixel_values_videos"]).logits
    assert (got - ref).abs().max().item() <= 1e-5
