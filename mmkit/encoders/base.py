"""The vision-encoder interface every backend implements.

An encoder maps pixel values [N, 3, S, S] to features [N, tokens, hidden]: the hidden state
``feature_layer`` (negative counts from the end, -1 = after the last block, never the final
norm), minus the CLS token when ``select == "patch"`` and the encoder has one.

Only the blocks whose output is used are run: with ``feature_layer=-2`` the last block and
the final norm are dead weight, so they stay in the state dict (exports stay complete) but
never run and never train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmkit.hub import HubUnavailableError  # noqa: F401  (re-exported: part of the encoder interface)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSpec:
    """What the image processor must produce for an encoder."""

    image_size: int
    patch_size: int
    mean: tuple
    std: tuple
    resize_mode: str = "shortest_edge_crop"  # CLIP; "squash" = resize to S x S (SigLIP)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def layers_to_run(num_layers: int, feature_layer: int) -> int:
    """How many blocks produce hidden state ``feature_layer`` (hidden_states[0] = embeddings)."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"model.vision.feature_layer={feature_layer} is out of range for an encoder with {num_layers} blocks"
        )
    return index


class VisionEncoder(nn.Module):
    """Base class: subclasses set ``spec``, ``hidden_size``, ``has_cls`` and implement ``embed``/``blocks``."""

    spec: ImageSpec
    hidden_size: int
    has_cls: bool

    def __init__(self, feature_layer: int = -2, select: str = "patch"):
        super().__init__()
        self.feature_layer = feature_layer
        self.select = select

    # subclasses provide these three
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden)
        return out[0] if isinstance(out, tuple) else out

    @property
    def num_layers_used(self) -> int:
        return layers_to_run(len(self.blocks()), self.feature_layer)

    def dead_parameters(self) -> list[nn.Parameter]:
        """Parameters that never contribute to the output (unused blocks, final norm, heads)."""
        used = {id(p) for p in self._embedding_parameters()}
        for block in list(self.blocks())[: self.num_layers_used]:
            used.update(id(p) for p in block.parameters())
        return [p for p in self.parameters() if id(p) not in used]

    def _embedding_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Tokens per view after selection."""
        n = self.spec.patches_per_side**2
        return n + 1 if (self.has_cls and self.select == "cls_patch") else n

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        hidden = self.embed(pixel_values.to(dtype))
        blocks = self.blocks()
        for block in list(blocks)[: self.num_layers_used]:
            hidden = self.run_block(block, hidden)
        if self.has_cls and self.select == "patch":
            hidden = hidden[:, 1:]
        return hidden
