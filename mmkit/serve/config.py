"""The server's settings and size parsing: stdlib only, so ``python -m mmkit.serve --help`` stays light."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MIB", "ServeConfig", "parse_size"]

MIB = 1024 * 1024


@dataclass
class ServeConfig:
    model_name: str = "mmkit"
    api_key: str | None = None
    max_images: int = 8  # per request
    max_image_bytes: int = 20 * MIB  # per image, encoded bytes
    max_pixels: int = 4096 * 4096  # per image, width * height from the header
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

    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + 4 * MIB


def parse_size(text: str | int) -> int:
    """``"20MB"`` / ``"512KiB"`` / ``"1000"`` -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 20MB, 512KiB, 1000000)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
              "KI": 1024, "KIB": 1024, "MI": 1024**2, "MIB": 1024**2, "GI": 1024**3, "GIB": 1024**3}
    return int(value * powers[unit])
