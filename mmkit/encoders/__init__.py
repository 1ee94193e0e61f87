"""Vision encoders. Importing this package registers clip, siglip, open_clip and timm."""

from mmkit.encoders.base import HubUnavailableError, ImageSpec, VisionEncoder
from mmkit.encoders import hf, other  # noqa: F401  (registration)

__all__ = ["HubUnavailableError", "ImageSpec", "VisionEncoder"]
