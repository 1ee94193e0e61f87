"""Tiny random llava-hf models written by transformers itself: the parity oracles."""

from __future__ import annotations

import time

import httpx
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 99
VOCAB = 128


def vision_config(kind: str, image_size: int = 28, patch: int = 14):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    if kind == "clip":
        return CLIPVisionConfig(**common)
    return SiglipVisionConfig(**common)


def text_config(kind: str, vocab: int = VOCAB):
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512)
    if kind == "llama":
        return LlamaConfig(**common, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2Config(**common, bos_token_id=None, eos_token_id=2, pad_token_id=0)


def tiny_llava_hf(text: str = "llama", vision: str = "clip", seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision_config(vision),
        text_config=text_config(text),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
        **kwargs,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    # random init leaves some weights at exactly 0/1 (norms, biases): perturb them so parity tests see every weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tokens_per_image(model: LlavaForConditionalGeneration) -> int:
    v = model.config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    if model.config.vision_config.model_type == "clip_vision_model" and \
            model.config.vision_feature_select_strategy == "full":
        n += 1
    return n


TILE = 28  # tiny encoders: 28 px input, 14 px patches -> 2x2 patches per view
NEXT_PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
OV_PINPOINTS = [[TILE * i, TILE * j] for i in range(1, 4) for j in range(1, 4)]


def tiny_llava_next_hf(text: str = "llama", vision: str = "clip", seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=vision_config(vision, TILE), text_config=text_config(text), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default" if vision == "clip" else "full",
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_llava_onevision_hf(seed: int = 0, anyres_max: int = 2):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        vision_config=vision_config("siglip", TILE), text_config=text_config("qwen2"), image_token_index=IMAGE_TOKEN,
        video_token_index=IMAGE_TOKEN + 1, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=f"anyres_max_{anyres_max}",
    )
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def wait_for_health(proc, base: str, timeout: float = 90) -> None:
    """Poll ``base``/health until a server subprocess answers 200 (fails if it exits or takes too long)."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.2)
