"""Small video files written with PyAV for the video tests (each frame's colour encodes its index)."""

from __future__ import annotations

import io

import numpy as np


def frame_color(i: int) -> tuple[int, int, int]:
    """The colour of frame ``i``: red steps by 8 per frame, green by 8 per 32 frames, so a frame tells its index."""
    return (8 * (i % 32), 8 * (i // 32 % 32), 128)


def write_video(path=None, frames: int = 10, fps: int = 10, size: tuple[int, int] = (32, 32), codec: str = "mpeg4",
                gop: int = 12, container: str = "mp4", options: dict | None = None) -> bytes:
    """A ``frames``-frame video (``size`` = (w, h)); returns its bytes (and writes ``path`` when given)."""
    import av  # the optional video extra: only these tests need it

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container, options=options or {}) as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = gop
        st.codec_context.bit_rate = 400_000
        for i in range(frames):
            arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            arr[:] = frame_color(i)
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


def audio_only() -> bytes:
    """A valid container with an audio stream and no video stream."""
    import av  # the optional video extra: only these tests need it

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        st = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for _ in range(4):
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def frame_index(frame) -> int:
    """The frame index a decoded frame's colour encodes (see :func:`frame_color`)."""
    arr = np.asarray(frame).astype(float)
    return int(round(arr[..., 0].mean() / 8)) + 32 * int(round(arr[..., 1].mean() / 8))
