"""The server's settings and size parsing: stdlib only, so ``python -m mmkit.serve --help`` stays light."""

from __future__ import annotations

from dataclasses import dataclass

from mmkit.processing.budget import CLI_FLAGS, DEFAULTS, ImageLimits, parse_size  # noqa: F401 (re-export)
from mmkit.processing.video import CLI_FLAGS as VIDEO_FLAGS
from mmkit.processing.video import VideoOptions

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
    prefix_cache: bool = True  # copy a prompt prefix another live or just finished request computed
    log_prompts: bool = False  # also log each request's messages (off: logs carry ids, counts and timings only)
    allow_remote_images: bool = False
    remote_timeout: float = 5.0  # seconds, per remote image fetch
    max_tokens_limit: int | None = None  # upper bound for max_tokens (default: the context length)
    default_max_tokens: int = 512
    default_temperature: float = 1.0  # the OpenAI default when a request gives none
    template: str | None = None
    system: str | None = None
    extra_model_names: tuple[str, ...] = ()
    max_body_bytes: int | None = None  # default: derived from the image and video limits
    # video_url parts (mmkit.processing.video): frames sampled per video, each frame held to the image limits
    max_videos: int = 1  # per request
    max_video_bytes: int = 64 * MIB  # encoded bytes of one video
    video_frames: int = 8  # frames spread uniformly over a video
    video_fps: float | None = None  # or frames per second, at most video_max_frames
    video_max_frames: int = 32
    max_video_decode_frames: int = 20_000  # frames decoded per video at most

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_pixels, self.max_image_aspect, self.max_resized_pixels,
                           names=CLI_FLAGS)

    def video_options(self) -> VideoOptions:
        """The :class:`mmkit.processing.video.VideoOptions` of these settings (ValueError names a bad flag)."""
        return VideoOptions(self.video_frames, self.video_fps, self.video_max_frames, self.max_video_bytes,
                            self.max_video_decode_frames, names=dict(VIDEO_FLAGS))

    def body_limit(self, videos: bool = False) -> int:
        """Bytes of a request body: the images' base64 (and, for a model that takes video, the videos')."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        video_share = self.max_videos * (self.max_video_bytes * 4 // 3 + 1024) if videos else 0
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + video_share + 4 * MIB
