"""mmkit's kernels, imported as ``mmkit_kernels`` (see pyproject: a top-level ``kernels``
package would collide with Hugging Face's ``kernels``).

Each op has a plain-torch reference (the production fallback and the test oracle), a Triton
kernel for CUDA, and one dispatch function chosen by ``MMKIT_KERNELS=auto|triton|torch``:

* ``merge_image_features`` (merge.py / merge_triton.py): token embedding + image-feature splice.
* ``project``, ``linear_projector``, ``mlp_gelu_projector`` (projector.py / projector_triton.py).
* ``fused_linear_cross_entropy`` (flce.py / flce_triton.py): LM-head loss without full logits.

Importing this package never imports Triton; the Triton modules load on first use.
"""

from mmkit_kernels.dispatch import kernel_mode, set_kernel_mode, last_path
from mmkit_kernels.flce import fused_linear_cross_entropy, linear_cross_entropy_reference
from mmkit_kernels.merge import merge_image_features
from mmkit_kernels.projector import linear_projector, mlp_gelu_projector, project

__all__ = [
    "kernel_mode",
    "set_kernel_mode",
    "last_path",
    "merge_image_features",
    "project",
    "linear_projector",
    "mlp_gelu_projector",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
]
