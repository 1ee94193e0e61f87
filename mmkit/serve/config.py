"""The server's settings and size parsing: stdlib only, so ``python -m mmkit.serve --help`` stays light."""

from __future__ import annotations

from dataclasses import dataclass

from mmkit.processing.budget import CLI_FLAGS, DEFAULTS, ImageLimits, parse_size  # noqa: F401 (re-export)

__all__ = ["MIB", "ServeConfig", "parse_size"]

MIB = 1024 * 1024


@dataclass
class ServeConfig:
    model_name: str = "mmkit"
    api_key: str | None = None
    max_images: int = 8  # per request
    # per image, the shared image budget (mmkit.processing.budget), checked before the expensive step:
    max_image_bytes: int = DEFAULTS["max_bytes"]  # encoded bytes
    max_pixels: int = DEFAULTS["max_pixels"]  # width * height from the header
    max_image_aspect: float = DEFAULTS["max_aspect"]  # long side / short side
    max_resized_pixels: int = DEFAULTS["max_resized_pixels"]  # the largest buffer after resize/pad
    queue_size: int = 16  # requests waiting for a batch slot
    concurrency: int = 16  # requests generating at the same time: the engine's batch size (--max-batch-size)
    max_batch_tokens: int = 512  # prompt tokens prefilled per step; longer prompts are prefilled in chunks
    image_cache_bytes: int = 256 * MIB  # image features kept for reuse (LRU)
    forward_threads: int = 1  # forward passes the engine runs at once (a prefill beside a decode step)
    log_prompts: bool = False  # also log each request's messages (off: logs carry ids, counts and timings only)
    allow_remote_images: bool = False
    remote_timeout: float = 5.0  # seconds, per remote image fetch
    max_tokens_limit: int | None = None  # upper bound for max_tokens (default: the context length)
    default_max_tokens: int = 512
    default_temperature: float = 1.0  # the OpenAI default when a request gives none
    template: str | None = None
    system: str | None = None
    extra_model_names: tuple[str, ...] = ()
    max_body_bytes: int | None = None  # default: derived from the image limits

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_pixels, self.max_image_aspect, self.max_resized_pixels,
                           names=CLI_FLAGS)

    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + 4 * MIB
