"""The vision-to-language projector: ``linear`` and ``mlp2x_gelu`` (LLaVA-1.5's
``Linear -> GELU() -> Linear``, exact erf GELU).

Weights use ``nn.Linear``'s layout: ``w`` is [out_features, in_features], ``b`` is [out_features].
``x`` is [..., in_features]. Each function dispatches (``MMKIT_KERNELS``) between a Triton kernel
(tiled GEMM with the bias and GELU fused into its epilogue, forward and backward, see
``projector_triton``) and the plain-torch reference below, which is also the fallback on
machines without a GPU. Honest expectations: the GEMMs dominate, so on a GPU the Triton path is
about at parity with cuBLAS; the fusion saves one [tokens, hidden] round trip per image and keeps
only the pre-activation for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkit_kernels import dispatch


def linear_projector_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def mlp_gelu_projector_torch(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _triton_module(x: torch.Tensor, *params):
    """The Triton implementation module if it should and can run on these tensors, else None."""
    if not dispatch.use_triton(x):
        return None
    try:
        # the Triton module imports triton: loaded only when a Triton path runs
        from mmkit_kernels import projector_triton
    except ImportError:
        return None
    return projector_triton if projector_triton.supported(x, *params) else None


def linear_projector(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + b`` (``F.linear``), Triton or torch."""
    impl = _triton_module(x, w, b)
    if impl is not None:
        dispatch.record("projector", "triton")
        return impl.linear_projector_triton(x, w, b)
    dispatch.record("projector", "torch")
    return linear_projector_torch(x, w, b)


def mlp_gelu_projector(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> torch.Tensor:
    """``gelu(x @ w1.T + b1) @ w2.T + b2`` with exact (erf) GELU, Triton or torch."""
    impl = _triton_module(x, w1, b1, w2, b2)
    if impl is not None:
        dispatch.record("projector", "triton")
        return impl.mlp_gelu_projector_triton(x, w1, b1, w2, b2)
    dispatch.record("projector", "torch")
    return mlp_gelu_projector_torch(x, w1, b1, w2, b2)


def project(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The projector's one dispatch point: ``linear`` when only ``(w1, b1)`` are given,
    ``mlp2x_gelu`` when ``w2`` is given too. For modules: ``project(x, l1.weight, l1.bias,
    l2.weight, l2.bias)``."""
    if w2 is None:
        if b2 is not None:
            raise ValueError("project: b2 given without w2")
        return linear_projector(x, w1, b1)
    return mlp_gelu_projector(x, w1, b1, w2, b2)
