"""Pixel parity of mmkit.processing.image.ImageProcessor with its transformers twins (oracles only).

backend="pil"  <-> transformers' PIL-backend processors (``*ImageProcessorPil``; == the original LLaVA pipeline)
backend="fast" <-> transformers' default torchvision-backend processors
Bound asserted: max abs diff <= 1e-5 (observed: 0.0, bit-exact, on this torch/torchvision/Pillow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    LlavaImageProcessor,
    LlavaNextImageProcessor,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionVideoProcessor,
    SiglipImageProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mmkit.processing.anyres import LLAVA_NEXT_PINPOINTS, ONEVISION_PINPOINTS
from mmkit.processing.image import (
    OPENAI_CLIP_MEAN,
    SIGLIP_MEAN,
    ImageProcessor,
    background_color,
    expand_to_square,
    to_rgb,
)
from mmkit.processing.spec import AnyResSpec

TOL = 1e-5
SIZES_WH = [(640, 480), (480, 640), (1000, 200), (200, 1000), (50, 53), (336, 336)]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth colour gradients + sensor-ish noise (exercises every resampling weight)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack(
        [128 + 100 * np.sin(x / 37 + seed), 128 + 100 * np.cos(y / 23), 128 + 80 * np.sin((x + y) / 51)], axis=-1
    )
    a += rng.normal(0, 20, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


CLIP_KW = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
OV_KW = dict(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

# name -> (mmkit factory(backend), HF pil twin, HF torchvision twin)
FLOWS = {
    "clip": (
        lambda b: ImageProcessor.clip(336, backend=b),
        lambda: CLIPImageProcessorPil(**CLIP_KW),
        lambda: CLIPImageProcessor(**CLIP_KW),
    ),
    "llava15_pad": (
        lambda b: ImageProcessor.llava15(backend=b),
        lambda: LlavaImageProcessorPil(do_pad=True, **CLIP_KW),
        lambda: LlavaImageProcessor(do_pad=True, **CLIP_KW),
    ),
    "llava_next": (
        lambda b: ImageProcessor.llava_next(backend=b),
        lambda: LlavaNextImageProcessorPil(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **CLIP_KW),
        lambda: LlavaNextImageProcessor(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **CLIP_KW),
    ),
    "onevision": (
        lambda b: ImageProcessor.onevision(backend=b),
        lambda: LlavaOnevisionImageProcessorPil(image_grid_pinpoints=ONEVISION_PINPOINTS, **OV_KW),
        lambda: LlavaOnevisionImageProcessor(image_grid_pinpoints=ONEVISION_PINPOINTS, **OV_KW),
    ),
    "siglip": (
        lambda b: ImageProcessor.siglip(384, backend=b),
        lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}),
        lambda: SiglipImageProcessor(size={"height": 384, "width": 384}),
    ),
}


@pytest.fixture(scope="module")
def images():
    return {wh: photo(*wh, seed=i) for i, wh in enumerate(SIZES_WH)}


def _hf_views(proc, image) -> torch.Tensor:
    pv = proc([image], return_tensors="pt")["pixel_values"]
    return pv[0] if pv.dim() == 5 else pv  # anyres: [1, n, 3, S, S]; single view: [1, 3, S, S]


@pytest.mark.parametrize("backend", ["pil", "fast"])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_pixel_parity(flow, backend, images):
    make, hf_pil, hf_fast = FLOWS[flow]
    mine, ref = make(backend), (hf_pil if backend == "pil" else hf_fast)()
    for wh, im in images.items():
        got, exp = mine.preprocess(im), _hf_views(ref, im)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert got.shape == exp.shape, (wh, got.shape, exp.shape)
        diff = (got - exp).abs().max().item()
        assert diff <= TOL, (flow, backend, wh, diff)


def _odd_modes(w: int = 640, h: int = 480) -> dict[str, Image.Image]:
    base = photo(w, h, 3)
    rng = np.random.default_rng(5)
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 3
    return {
        "RGBA": rgba,
        "L": base.convert("L"),
        "LA": rgba.convert("LA"),
        "P+transparency": pal,
        "CMYK": base.convert("CMYK"),
    }


@pytest.mark.parametrize("backend", ["pil", "fast"])
@pytest.mark.parametrize("flow", ["llava15_pad", "llava_next"])
def test_non_rgb_inputs(flow, backend):
    make, hf_pil, hf_fast = FLOWS[flow]
    mine, ref = make(backend), (hf_pil if backend == "pil" else hf_fast)()
    for mode, im in _odd_modes().items():
        got, exp = mine.preprocess(im), _hf_views(ref, im)
        assert got.shape == exp.shape and (got - exp).abs().max().item() <= TOL, (mode, backend)


def test_rgb_conversion_conventions():
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 0))  # fully transparent red
    assert to_rgb(rgba, "hf").getpixel((0, 0)) == (255, 255, 255)  # composited on white (transformers)
    assert to_rgb(rgba, "orig").getpixel((0, 0)) == (200, 10, 10)  # .convert('RGB') drops alpha (orig / tf 4.36)
    gray = Image.new("L", (3, 2), 77)
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((1, 1)) == (77, 77, 77)
    arr = np.zeros((5, 6, 3), np.uint8)
    assert to_rgb(arr).size == (6, 5) and to_rgb(torch.zeros(3, 5, 6, dtype=torch.uint8)).size == (6, 5)


def test_expand_to_square():
    assert background_color(OPENAI_CLIP_MEAN) == (122, 116, 104)
    assert background_color(SIGLIP_MEAN) == (127, 127, 127)
    im = Image.new("RGB", (10, 4), (1, 2, 3))
    sq = expand_to_square(im, (122, 116, 104))
    a = np.asarray(sq)
    assert sq.size == (10, 10) and (a[:3] == (122, 116, 104)).all() and (a[3:7] == (1, 2, 3)).all()
    assert (a[7:] == (122, 116, 104)).all()  # offset (10-4)//2 = 3 on top, remainder below
    tall = np.asarray(expand_to_square(Image.new("RGB", (3, 8), (9, 9, 9)), (0, 0, 0)))
    assert (tall[:, 2:5] == 9).all() and (tall[:, :2] == 0).all() and (tall[:, 5:] == 0).all()
    assert expand_to_square(im.resize((5, 5)), (0, 0, 0)).size == (5, 5)


@pytest.mark.parametrize("backend", ["pil", "fast"])
def test_batch_call_and_multi_image(backend, images):
    """__call__ matches HF batch output; OneVision multi-image (nested list) gives one padded view per image."""
    ims = [images[(640, 480)], images[(50, 53)], images[(1000, 200)]]
    mine = ImageProcessor.onevision(backend=backend)
    ref = (LlavaOnevisionImageProcessorPil if backend == "pil" else LlavaOnevisionImageProcessor)(**OV_KW)
    out = mine(ims)
    exp = ref(ims, return_tensors="pt")
    assert out["image_sizes"] == [tuple(s) for s in exp["image_sizes"].tolist()] == [(480, 640), (53, 50), (200, 1000)]
    for pv, epv in zip(out["pixel_values"], exp["pixel_values"]):  # HF zero-pads the view axis to the batch max
        assert (pv - epv[: pv.shape[0]]).abs().max().item() <= TOL
    out = mine(ims, multi_image=True)
    exp = ref([ims], return_tensors="pt")
    assert exp["batch_num_images"].tolist() == [3]
    for pv, epv in zip(out["pixel_values"], exp["pixel_values"]):
        assert pv.shape == (1, 3, 384, 384) and (pv - epv[:1]).abs().max().item() <= TOL


def test_video_frames_match_onevision_video_processor():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    exp = LlavaOnevisionVideoProcessor(**OV_KW)([frames], return_tensors="pt")["pixel_values_videos"][0]
    got = ImageProcessor.onevision(backend="fast").preprocess_video([Image.fromarray(f) for f in frames])
    assert got.shape == exp.shape == (3, 3, 384, 384) and (got - exp).abs().max().item() <= TOL


def test_orig_convention_pixels():
    """'orig' reads pinpoints as [w, h]: for a small image it tiles 1 wide x 2 tall; pixels == the PIL pipeline run
    on the transposed list (which makes HF pick the same canvas)."""
    im = photo(50, 53, 9)
    orig = ImageProcessor.llava_next(backend="pil", convention="orig").preprocess(im)
    hf = ImageProcessor.llava_next(backend="pil", convention="hf").preprocess(im)
    transposed = [[b, a] for a, b in LLAVA_NEXT_PINPOINTS]
    exp = _hf_views(LlavaNextImageProcessorPil(image_grid_pinpoints=transposed, **CLIP_KW), im)
    assert orig.shape == exp.shape == (3, 3, 336, 336) and (orig - exp).abs().max().item() <= TOL
    assert not torch.equal(orig[1:], hf[1:])  # different tiles
    assert torch.equal(orig[0], hf[0])  # same squashed base view


def test_shapes_and_validation():
    ip = ImageProcessor.llava_next()
    assert ip.preprocess(photo(640, 480)).shape == (5, 3, 336, 336)
    assert ip.num_views((480, 640)) == 5 and ip.num_views((480, 640), multi_image=True) == 1
    assert ImageProcessor.llava15().num_image_tokens((480, 640), 24) == 576
    assert ImageProcessor.llava15(merge="spatial_unpad").num_image_tokens((480, 640), 24) == 577
    with pytest.raises(ValueError):
        AnyResSpec.create(336, aspect_ratio="anyres")  # needs pinpoints
    with pytest.raises(ValueError):
        AnyResSpec.create(336, backend="cv2")
    with pytest.raises(ValueError):
        ImageProcessor(AnyResSpec(336), resize_mode="crop")
    with pytest.raises(ValueError):
        AnyResSpec.create(336, convention="new")


def test_parallel_resize_is_deterministic():
    im = photo(640, 480, 4)
    a = ImageProcessor.llava_next(parallel_resize=True).preprocess(im)
    b = ImageProcessor.llava_next(parallel_resize=False).preprocess(im)
    assert torch.equal(a, b)


class _Photos(torch.utils.data.Dataset):
    def __init__(self, proc):
        self.proc = proc

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.proc.preprocess(photo(640, 480, i))


def test_dataloader_workers_after_fork():
    """The helper thread is per process: a forked DataLoader worker gets its own and gives identical pixels."""
    proc = ImageProcessor.llava_next(backend="pil")
    local = [proc.preprocess(photo(640, 480, i)) for i in range(2)]  # parent's helper thread exists now
    loader = torch.utils.data.DataLoader(
        _Photos(proc), batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=60
    )
    got = list(loader)
    assert all(torch.equal(a, b) for a, b in zip(got, local))
