"""mmkit.load of transformers-written llava-hf directories gives transformers' logits (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

import mmkit
from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tokens_per_image

TOL = 1e-5
CASES = [("llama", "clip"), ("qwen2", "siglip"), ("llama", "siglip"), ("qwen2", "clip")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request, tmp_path_factory):
    text, vision = request.param
    hf = tiny_llava_hf(text, vision)
    path = tmp_path_factory.mktemp(f"{text}-{vision}")
    hf.save_pretrained(path)
    ours = mmkit.load(path).eval()
    return hf, ours


def _ids(*parts, n_img):
    out = []
    for part in parts:
        out += [IMAGE_TOKEN] * n_img if part == "img" else list(part)
    return torch.tensor([out])


def _compare(hf, ours, **inputs):
    with torch.no_grad():
        ref = hf(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff}"
    return diff


def test_image_and_prompt(pair):
    hf, ours = pair
    n = tokens_per_image(hf)
    ids = _ids([1, 5, 6], "img", [7, 8, 9, 10], n_img=n)
    pixels = torch.randn(1, 3, 28, 28)
    _compare(hf, ours, input_ids=ids, pixel_values=pixels)


def test_text_only(pair):
    hf, ours = pair
    _compare(hf, ours, input_ids=torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]]))


def test_two_images_in_one_prompt(pair):
    hf, ours = pair
    n = tokens_per_image(hf)
    ids = _ids([1, 5], "img", [6, 7], "img", [8, 9], n_img=n)
    pixels = torch.randn(2, 3, 28, 28)
    _compare(hf, ours, input_ids=ids, pixel_values=pixels)


def test_padded_batch_of_two(pair):
    hf, ours = pair
    n = tokens_per_image(hf)
    long = [1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9, 10, 11, 12]
    short = [1, 5] + [IMAGE_TOKEN] * n + [7, 8]
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])  # left padding
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert (got - ref)[real].abs().max().item() <= TOL


def test_loss_matches_transformers(pair):
    hf, ours = pair
    n = tokens_per_image(hf)
    ids = _ids([1, 5, 6], "img", [7, 8, 9, 10, 11], n_img=n)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100  # transformers does not mask image labels itself
    labels[:, :3] = -100
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
        got = ours(input_ids=ids, pixel_values=pixels, labels=labels).loss
        # mmkit never supervises image positions, even when the caller forgets to mask them
        unmasked = ours(input_ids=ids, pixel_values=pixels, labels=ids.clone().masked_fill(
            torch.arange(ids.shape[1]) < 3, -100)).loss
    assert abs(got.item() - ref.item()) <= TOL
    assert abs(unmasked.item() - ref.item()) <= TOL


def test_feature_count_mismatch_is_a_clear_error(pair):
    hf, ours = pair
    ids = _ids([1, 5], "img", [6], n_img=3)
    with pytest.raises(ValueError, match="image-token placeholders"):
        ours(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28))


def test_dead_vision_layers_never_run(pair):
    _, ours = pair
    enc = ours.vision
    last = enc.blocks()[-1]
    calls = []
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            enc(torch.randn(1, 3, 28, 28))
    finally:
        handle.remove()
    assert calls == []
    assert enc.num_layers_used == len(enc.blocks()) - 1
    assert all(not p.requires_grad for p in last.parameters())
