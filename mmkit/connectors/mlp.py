"""identity, linear and mlpNx_gelu connectors with the original LLaVA parameter layout.

``linear``      -> ``proj`` = nn.Linear(vision_hidden, llm_hidden)          (orig: mm_projector.{weight,bias})
``mlp2x_gelu``  -> ``proj`` = Sequential(Linear, GELU(erf), Linear)         (orig: mm_projector.{0,2}.*)
``mlpNx_gelu``  -> N linears with exact GELU between them                  (orig: mm_projector.{0,2,..,2N-2}.*)
"""

from __future__ import annotations

import torch
from torch import nn

from mmkit.registry import connectors
from mmkit_kernels import linear_projector, mlp_gelu_projector


class Connector(nn.Module):
    in_features: int
    out_features: int
    kind: str


class IdentityConnector(Connector):
    kind = "identity"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features != out_features:
            raise ValueError(
                f"model.connector.name=identity needs equal widths, but the encoder gives {in_features} "
                f"and the LLM expects {out_features}"
            )
        self.in_features = self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LinearConnector(Connector):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_projector(x, self.proj.weight, self.proj.bias)


class MLPConnector(Connector):
    def __init__(self, in_features: int, out_features: int, depth: int = 2, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.depth = in_features, out_features, depth
        self.kind = f"mlp{depth}x_gelu"
        layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features, bias=bias)]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 2:  # the fused-projector dispatch point (Triton on GPU, torch elsewhere)
            first, last = self.proj[0], self.proj[2]
            return mlp_gelu_projector(x, first.weight, first.bias, last.weight, last.bias)
        return self.proj(x)


connectors.register("identity", obj=IdentityConnector)
connectors.register("linear", obj=LinearConnector)
for _depth in range(1, 7):
    connectors.register(
        f"mlp{_depth}x_gelu",
        obj=lambda i, o, bias=True, _d=_depth: MLPConnector(i, o, depth=_d, bias=bias),
    )
