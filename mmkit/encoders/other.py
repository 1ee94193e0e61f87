"""ViT encoders from open_clip and timm behind the same interface as CLIP/SigLIP.

Recipe examples::

    vision: {name: open_clip, pretrained: "ViT-B-16::laion2b_s34b_b88k"}     # model::tag or model::/path/weights
    vision: {name: open_clip, config: {image_size: 32, patch_size: 8, width: 64, layers: 2, heads: 2}}
    vision: {name: timm, pretrained: "vit_base_patch16_clip_224.openai"}       # or {model_name, file: /path}
    vision: {name: timm, config: {model_name: vit_tiny_patch16_224, img_size: 32, patch_size: 8, depth: 2}}
"""

from __future__ import annotations

from torch import nn

from mmkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, VisionEncoder
from mmkit.registry import encoders


class _ConfigDictEncoder(VisionEncoder):
    """Encoders whose recipe config is a plain dict and whose image spec is fixed at construction."""

    _spec: ImageSpec
    config: dict

    @property
    def spec(self) -> ImageSpec:
        return self._spec

    def config_dict(self) -> dict:
        return dict(self.config)


class OpenCLIPEncoder(_ConfigDictEncoder):
    """The visual tower of an open_clip model (``open_clip.transformer.VisionTransformer``)."""

    has_cls = True

    def __init__(self, visual: nn.Module, config: dict, feature_layer: int = -2, select: str = "patch"):
        super().__init__(feature_layer, select)
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError(f"open_clip encoder: {type(visual).__name__} is not a ViT; only ViT towers are supported")
        self.visual = visual
        self.config = config
        self.hidden_size = visual.conv1.out_channels
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        mean = tuple(config.get("mean", OPENAI_CLIP_MEAN))
        std = tuple(config.get("std", OPENAI_CLIP_STD))
        self._spec = ImageSpec(int(size), int(patch), mean, std)

    def embed(self, pixel_values):
        return self.visual._embeds(pixel_values)

    def blocks(self):
        return self.visual.transformer.resblocks

    def _embedding_parameters(self):
        v = self.visual
        return [v.class_embedding, v.positional_embedding, *v.conv1.parameters(), *v.ln_pre.parameters()]


@encoders.register("open_clip", aliases=("openclip",))
def build_open_clip(cfg) -> OpenCLIPEncoder:
    # optional backend, slow to import: only when an open_clip encoder is built
    import open_clip
    from open_clip.transformer import VisionTransformer

    config = dict(cfg.config)
    if cfg.pretrained:
        name, _, tag = cfg.pretrained.partition("::")
        model = open_clip.create_model(name, pretrained=tag or None)
        visual = model.visual
        config.setdefault("model_name", name)
    else:
        keys = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
        defaults = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "mlp_ratio": 4.0}
        unknown = set(config) - set(keys) - {"output_dim", "mean", "std"}
        if unknown:
            raise ValueError(f"model.vision.config: unknown open_clip keys {sorted(unknown)}; known: {list(keys)}")
        args = {k: config.get(k, defaults[k]) for k in keys}
        visual = VisionTransformer(output_dim=config.get("output_dim", args["width"]), **args)
        config = {**args, **config}
    return OpenCLIPEncoder(visual, config, cfg.feature_layer, cfg.select)


class TimmEncoder(_ConfigDictEncoder):
    """A timm ``VisionTransformer``."""

    def __init__(self, model: nn.Module, config: dict, feature_layer: int = -2, select: str = "patch"):
        super().__init__(feature_layer, select)
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise ValueError(f"timm encoder: {type(model).__name__} is not a ViT; only ViT models are supported")
        self.model = model
        self.config = config
        self.has_cls = model.cls_token is not None
        if getattr(model, "num_prefix_tokens", int(self.has_cls)) != int(self.has_cls):
            raise ValueError("timm encoder: register tokens are not supported")
        self.hidden_size = model.embed_dim
        data = getattr(model, "pretrained_cfg", {}) or {}
        size = model.patch_embed.img_size[0]
        patch = model.patch_embed.patch_size[0]
        mean = tuple(config.get("mean", data.get("mean", IMAGENET_MEAN)))
        std = tuple(config.get("std", data.get("std", IMAGENET_STD)))
        self._spec = ImageSpec(int(size), int(patch), mean, std)

    def embed(self, pixel_values):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))

    def blocks(self):
        return self.model.blocks

    def _embedding_parameters(self):
        m = self.model
        params = [*m.patch_embed.parameters(), *m.norm_pre.parameters()]
        params += [p for p in (m.cls_token, m.pos_embed) if p is not None]
        return params


@encoders.register("timm")
def build_timm(cfg) -> TimmEncoder:
    # optional backend, slow to import: only when a timm encoder is built
    import timm

    config = dict(cfg.config)
    extra = {k: v for k, v in config.items() if k not in ("model_name", "file", "mean", "std")}
    if cfg.pretrained:
        name = config.get("model_name", cfg.pretrained)
        overlay = {"file": config["file"]} if "file" in config else None
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **extra)
        config.setdefault("model_name", name)
    else:
        name = config.get("model_name", "vit_base_patch16_224")
        model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
        config["model_name"] = name
    return TimmEncoder(model, config, cfg.feature_layer, cfg.select)


__all__ = ["OpenCLIPEncoder", "TimmEncoder", "build_open_clip", "build_timm"]
