"""CLIP and SigLIP encoders over transformers' vision models."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from mmkit.encoders.base import HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, VisionEncoder
from mmkit.hub import from_pretrained
from mmkit.recipe import check_known_fields
from mmkit.registry import encoders


class HFVisionEncoder(VisionEncoder):
    """A transformers CLIP/SigLIP vision model, run only up to the selected layer."""

    config_class: type
    model_class: type

    def __init__(self, model: nn.Module, feature_layer: int = -2, select: str = "patch"):
        super().__init__(feature_layer, select)
        # transformers 5 flattens CLIPVisionModel; older versions nest it under .vision_model
        self.tower = getattr(model, "vision_model", model)
        self.config = model.config
        self.hidden_size = model.config.hidden_size

    @classmethod
    def build(cls, cfg) -> "HFVisionEncoder":
        if cfg.pretrained:
            model = from_pretrained(cls.model_class.from_pretrained, cfg.pretrained, "vision encoder", "model.vision.pretrained")
        else:
            check_known_fields(cls.config_class(), cfg.config, "model.vision.config", cls.config_class.__name__)
            model = cls.model_class(cls.config_class(**cfg.config))
        return cls(model, cfg.feature_layer, cfg.select)

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    def run_block(self, block, hidden):
        out = block(hidden, None)
        return out[0] if isinstance(out, tuple) else out


class CLIPEncoder(HFVisionEncoder):
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel
    has_cls = True

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.config.image_size, self.config.patch_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))

    def _embedding_parameters(self):
        return [*self.tower.embeddings.parameters(), *self.tower.pre_layrnorm.parameters()]


class SiglipEncoder(HFVisionEncoder):
    config_class = SiglipVisionConfig
    model_class = SiglipVisionModel
    has_cls = False

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.config.image_size, self.config.patch_size, HALF, HALF, resize_mode="squash")

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower.embeddings(pixel_values)

    def _embedding_parameters(self):
        return list(self.tower.embeddings.parameters())


@encoders.register("clip", aliases=("clip_vit",))
def build_clip(cfg) -> CLIPEncoder:
    return CLIPEncoder.build(cfg)


@encoders.register("siglip")
def build_siglip(cfg) -> SiglipEncoder:
    return SiglipEncoder.build(cfg)
