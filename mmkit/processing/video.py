"""Video files -> sampled RGB frames and their timestamps, decoded with PyAV (the ``av`` package, the ``video`` extra).

Two samplings, as LLaVA-Video's ``load_video`` (``llava/train/train.py`` in LLaVA-NeXT) does them:

* ``num_frames=N``: N frames spread uniformly over the whole video (the first frame and the last one included);
* ``fps=F``: one frame every ``1/F`` seconds from the start, at most ``max_frames`` (more are thinned uniformly
  to ``max_frames``).

Limits, each checked before the step it protects: encoded bytes (``max_bytes``), the frame size from the stream
header against the image budget (:class:`mmkit.processing.budget.ImageLimits`: pixels, aspect, size after
resize) and again on every decoded frame, and ``max_decode_frames``: no more frames than that are decoded per
video, so a file with a bogus header or a huge frame count ends with an error instead of a long decode. Every
failure is a :class:`VideoError` whose ``reason`` says which (``REASONS``).
"""

from __future__ import annotations

import argparse
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mmkit.processing.budget import ImageLimitError, ImageLimits

__all__ = ["CLI_FLAGS", "REASONS", "DecodedVideo", "VideoError", "VideoOptions", "add_video_flags", "decode_video",
           "options_from_args", "sample_times", "time_instruction"]

# the command-line flags of the server and mmkit.chat, per VideoOptions field (named in error messages)
CLI_FLAGS = {"num_frames": "--video-frames", "fps": "--video-fps", "max_frames": "--video-max-frames",
             "max_bytes": "--max-video-bytes", "max_decode_frames": "--max-video-decode-frames"}

REASONS = ("unreadable", "no_video_stream", "no_frames", "truncated", "too_large", "too_many_bytes",
           "too_many_frames")


class VideoError(ValueError):
    """A video that cannot be used; ``reason`` is one of ``REASONS`` (training counts skips by it)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoOptions:
    """How frames are sampled and how much one video may cost. Exactly one of ``num_frames`` / ``fps`` is used:
    ``fps`` when it is set, else ``num_frames``."""

    num_frames: int = 8  # uniform sampling: frames per video
    fps: float | None = None  # frame-rate sampling: frames per second of video (capped at max_frames)
    max_frames: int = 32  # the cap of frame-rate sampling
    max_bytes: int = 512 * 1024 * 1024  # encoded bytes of one video
    max_decode_frames: int = 20_000  # frames decoded per video at most (never a hang on a bogus file)
    names: dict = field(default_factory=dict, compare=False, repr=False)  # setting name per field, for messages

    def __post_init__(self):
        def bad(key, want, got):
            return ValueError(f"{self.names.get(key, key)}: expected {want}, got {got!r}")

        for key in ("num_frames", "max_frames", "max_bytes", "max_decode_frames"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "a positive integer", v)
        if self.fps is not None and (isinstance(self.fps, bool) or not isinstance(self.fps, (int, float))
                                     or not math.isfinite(self.fps) or self.fps <= 0):
            raise bad("fps", "a positive number of frames per second (or null for uniform sampling)", self.fps)

    @classmethod
    def from_config(cls, cfg: Any = None, names: dict | None = None) -> VideoOptions:
        """From a mapping or object with some of the fields (missing or None ones are the defaults, ``fps`` None)."""
        if cfg is None:
            return cls(names=dict(names or {}))
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        keys = ("num_frames", "fps", "max_frames", "max_bytes", "max_decode_frames")
        return cls(**{k: get(k, None) for k in keys if get(k, None) is not None}, names=dict(names or {}))


@dataclass
class DecodedVideo:
    """Sampled frames (RGB PIL images, in time order), their timestamps in seconds and the video's duration."""

    frames: list
    timestamps: list[float]
    duration: float


def sample_times(duration: float, frame_rate: float, options: VideoOptions) -> list[float]:
    """Target timestamps (seconds) for a video of ``duration`` s at ``frame_rate`` frames/s."""
    total = max(1, int(round(duration * frame_rate)))
    last = (total - 1) / frame_rate  # the last frame's start time
    if options.fps is not None:
        n = int(math.floor(last * options.fps + 1e-9)) + 1
        if n > options.max_frames:  # thinned uniformly, like LLaVA-Video's max_frames_num (a bogus huge
            # duration in a header must not build a huge list first)
            return [last * i / (options.max_frames - 1) if options.max_frames > 1 else 0.0
                    for i in range(options.max_frames)]
        return [i / options.fps for i in range(n)]
    n = options.num_frames
    return [last * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def time_instruction(video: DecodedVideo) -> str:
    """LLaVA-Video's ``add_time_instruction`` text (``llava/train/train.py``): the duration and frame times."""
    times = ",".join(f"{t:.2f}s" for t in video.timestamps)
    return (f"The video lasts for {video.duration:.2f} seconds, and {len(video.frames)} frames are uniformly "
            f"sampled from it. These frames are located at {times}.Please answer the following questions related "
            f"to this video.")


def _open_source(source, options: VideoOptions):
    if isinstance(source, (bytes, bytearray, memoryview)):
        n = len(source)
        handle = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        n = os.path.getsize(source)  # FileNotFoundError passes through
        handle = source
    else:  # a binary file object: its remaining length
        pos = source.tell()
        n = source.seek(0, os.SEEK_END) - pos
        source.seek(pos)
        handle = source
    if n > options.max_bytes:
        raise VideoError("too_many_bytes", f"video is too large: {n} bytes, the limit is {options.max_bytes} bytes"
                                           f" (raise it with {options.names.get('max_bytes', 'max_bytes')})")
    if n == 0:
        raise VideoError("unreadable", "video is empty (0 bytes)")
    return handle


def _check_size(limits: ImageLimits, width: int, height: int, image_processor) -> None:
    try:
        limits.check_size(width, height, image_processor)
    except ImageLimitError as exc:
        raise VideoError("too_large", f"video frame: {exc}") from None


def decode_video(source, options: VideoOptions | None = None, limits: ImageLimits | None = None,
                 image_processor=None, name: str = "video") -> DecodedVideo:
    """A path, bytes or binary file -> :class:`DecodedVideo` (``options`` sampling; ``limits`` per frame).

    Frames are decoded in order from the start, seeking forward (to the keyframe before a target) when the next
    target is more than a few seconds ahead, so a long video costs about the sampled frames' GOPs. Raises
    :class:`VideoError` (``FileNotFoundError`` passes through); ``name`` goes into the messages."""
    import av  # PyAV is the optional ``video`` extra: only a video pays for importing it

    options = options or VideoOptions()
    limits = limits or ImageLimits()
    handle = _open_source(source, options)
    try:
        container = av.open(handle, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoError("unreadable", f"{name}: not a readable video ({exc})") from None
    with container:
        streams = container.streams.video
        if not streams:
            raise VideoError("no_video_stream", f"{name}: the file has no video stream")
        stream = streams[0]
        stream.thread_type = "AUTO"
        cc = stream.codec_context
        if cc.width and cc.height:
            _check_size(limits, cc.width, cc.height, image_processor)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        tb = float(stream.time_base) if stream.time_base else None
        duration = None
        if stream.duration and tb:
            duration = stream.duration * tb
        elif container.duration:
            duration = container.duration / 1_000_000
        elif stream.frames:
            duration = stream.frames / rate
        if duration is None or duration <= 0:  # no duration in the headers: count frames first (bounded)
            duration = _count_frames(container, stream, options, name) / rate
            container.seek(0)
        targets = sample_times(duration, rate, options)
        return _decode_at(container, stream, targets, duration, rate, tb, options, limits, image_processor, name)


def _count_frames(container, stream, options, name) -> int:
    import av  # the optional extra, as in decode_video

    n = 0
    try:
        for _ in container.decode(stream):
            n += 1
            if n > options.max_decode_frames:
                flag = options.names.get("max_decode_frames", "max_decode_frames")
                raise VideoError("too_many_frames", f"{name}: more than {options.max_decode_frames} frames "
                                                    f"(raise it with {flag})")
    except av.error.FFmpegError as exc:
        if n == 0:
            raise VideoError("truncated", f"{name}: the video data is damaged ({exc})") from None
    if n == 0:
        raise VideoError("no_frames", f"{name}: the video stream has no frames")
    return n


_SEEK_AHEAD_S = 4.0  # seek when the next target is further than this; closer ones are cheaper to decode to


def _decode_at(container, stream, targets, duration, rate, tb, options, limits, image_processor, name):
    import av  # the optional extra, as in decode_video

    half = 0.5 / rate
    frames, stamps = [], []
    decoded = 0
    last = None  # (time, frame) of the latest decoded frame
    i = 0

    def frame_time(fr):
        if fr.pts is not None and tb:
            return fr.pts * tb - start
        return decoded / rate

    def take(fr, t):
        if fr.width and fr.height and (fr.width, fr.height) != (stream.codec_context.width,
                                                               stream.codec_context.height):
            _check_size(limits, fr.width, fr.height, image_processor)
        frames.append(fr.to_image())  # RGB24 PIL image
        stamps.append(round(t, 6))

    seeked = set()  # targets already sought: one seek per target, so a long GOP cannot loop
    start = float(stream.start_time or 0) * tb if tb else 0.0
    while i < len(targets):
        restart = False
        ahead = targets[i] - (last[0] if last is not None else 0.0)
        if tb and i not in seeked and ahead > _SEEK_AHEAD_S:
            seeked.add(i)
            container.seek(int((targets[i] + start) / tb), stream=stream, backward=True, any_frame=False)
        try:
            for fr in container.decode(stream):
                decoded += 1
                if decoded > options.max_decode_frames:
                    raise VideoError("too_many_frames", f"{name}: decoded {options.max_decode_frames} frames without "
                                     f"reaching the sampled times (raise it with "
                                     f"{options.names.get('max_decode_frames', 'max_decode_frames')})")
                t = frame_time(fr)
                last = (t, fr)
                while i < len(targets) and t >= targets[i] - half:
                    take(fr, t)
                    i += 1
                if i >= len(targets):
                    break
                if tb and i not in seeked and targets[i] - t > _SEEK_AHEAD_S:
                    restart = True
                    break
        except av.error.FFmpegError as exc:
            if last is None:
                raise VideoError("truncated", f"{name}: the video data is damaged ({exc})") from None
            restart = False  # a damaged tail: judged below like an early end
        if restart:
            continue
        break
    if i < len(targets):
        if last is None:
            raise VideoError("no_frames", f"{name}: the video stream has no decodable frames")
        if targets[i] - last[0] > 2.0 / rate:  # the stream ends well before its header says
            raise VideoError("truncated", f"{name}: the video ends at {last[0]:.2f} s but its header says "
                                          f"{duration:.2f} s (a truncated file?)")
        while i < len(targets):  # the last target is within a frame of the end: the last frame stands in
            take(last[1], last[0])
            i += 1
    return DecodedVideo(frames=frames, timestamps=stamps, duration=float(duration))


def add_video_flags(p: argparse.ArgumentParser, max_bytes: int = 64 * 1024 * 1024) -> None:
    """Sampling and limits of videos (``CLI_FLAGS``), shared by the server and mmkit.chat."""
    from mmkit.processing.budget import parse_size  # the same size syntax as --max-image-bytes

    g = p.add_argument_group("videos (decoded with PyAV; each frame is held to the image limits)")
    g.add_argument("--video-frames", type=int, default=8, help="frames spread uniformly over a video "
                   "(default: %(default)s)")
    g.add_argument("--video-fps", type=float, default=None, help="sample this many frames per second instead, at "
                   "most --video-max-frames")
    g.add_argument("--video-max-frames", type=int, default=32, help="the cap of --video-fps (default: %(default)s)")
    g.add_argument("--max-video-bytes", type=parse_size, default=max_bytes,
                   help=f"encoded bytes of one video (default: {max_bytes // 2**20}MiB)")
    g.add_argument("--max-video-decode-frames", type=int, default=20_000,
                   help="frames decoded per video at most (default: %(default)s)")


def options_from_args(args) -> VideoOptions:
    """The :class:`VideoOptions` of the flags of :func:`add_video_flags` (a ValueError names a bad flag)."""
    return VideoOptions(args.video_frames, args.video_fps, args.video_max_frames, args.max_video_bytes,
                        args.max_video_decode_frames, names=dict(CLI_FLAGS))
