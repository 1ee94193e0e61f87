"""mmkit.processing.video: sampling, timestamps and bad files, on videos written here with PyAV."""

from __future__ import annotations

import pytest

av = pytest.importorskip("av")

from mmkit.processing.budget import ImageLimits  # noqa: E402
from mmkit.processing.video import VideoError, VideoOptions, decode_video, sample_times, time_instruction  # noqa: E402
from tests.videos import audio_only, frame_index, write_video  # noqa: E402


def test_uniform_sampling_takes_first_and_last_frames(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, frames=10, fps=10)
    v = decode_video(path, VideoOptions(num_frames=4))
    assert [frame_index(f) for f in v.frames] == [0, 3, 6, 9]
    assert v.timestamps == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert v.duration == pytest.approx(1.0)
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in v.frames)


def test_fps_sampling_and_its_cap():
    data = write_video(frames=40, fps=10)
    v = decode_video(data, VideoOptions(fps=2))
    assert v.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    assert [frame_index(f) for f in v.frames] == [0, 5, 10, 15, 20, 25, 30, 35]
    capped = decode_video(data, VideoOptions(fps=10, max_frames=4))
    assert [frame_index(f) for f in capped.frames] == [0, 13, 26, 39]


def test_more_frames_than_the_video_repeats_frames():
    v = decode_video(write_video(frames=3, fps=10), VideoOptions(num_frames=5))
    assert len(v.frames) == 5 and [frame_index(f) for f in v.frames][0] == 0


def test_long_video_is_sought_not_decoded_whole():
    data = write_video(frames=3000, fps=30, gop=30, size=(16, 16))
    v = decode_video(data, VideoOptions(num_frames=3, max_decode_frames=200))  # 3000 frames would not fit
    assert v.timestamps == pytest.approx([0.0, 49.9667, 99.9667], abs=1e-3)
    assert [frame_index(f) for f in v.frames] == [0, 1499 % 1024, 2999 % 1024]


def test_h264_when_available():
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264")
    v = decode_video(write_video(frames=10, codec="libx264"), VideoOptions(num_frames=3))
    assert [frame_index(f) for f in v.frames] == [0, 4, 9]


def test_sample_times_and_time_instruction():
    assert sample_times(1.0, 10, VideoOptions(num_frames=1)) == [0.0]
    huge = sample_times(1e12, 30, VideoOptions(fps=30, max_frames=4))  # a bogus header: 4 targets, at once
    assert len(huge) == 4 and huge[0] == 0.0
    v = decode_video(write_video(frames=10), VideoOptions(num_frames=2))
    assert "lasts for 1.00 seconds" in time_instruction(v) and "0.00s,0.90s" in time_instruction(v)


@pytest.mark.parametrize("kwargs,key", [({"num_frames": 0}, "num_frames"), ({"fps": -1}, "fps"),
                                        ({"max_frames": True}, "max_frames"), ({"fps": float("nan")}, "fps")])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"data.video.{key}"):
        VideoOptions(**kwargs, names={k: f"data.video.{k}" for k in ("num_frames", "fps", "max_frames")})


def _reason(source, **kw):
    with pytest.raises(VideoError) as exc:
        decode_video(source, **kw)
    return exc.value.reason, str(exc.value)


def test_bad_videos_have_a_reason():
    assert _reason(b"not a video at all" * 50)[0] == "unreadable"
    assert _reason(b"")[0] == "unreadable"
    assert _reason(audio_only())[0] == "no_video_stream"
    mkv = write_video(frames=100, container="matroska", gop=10)
    reason, msg = _reason(mkv[: len(mkv) // 2])
    assert reason == "truncated" and "header says 10.00 s" in msg
    reason, msg = _reason(write_video(frames=4, size=(64, 64)), limits=ImageLimits(max_pixels=1000))
    assert reason == "too_large" and "64x64" in msg and "--max-pixels" in msg
    reason, msg = _reason(mkv, options=VideoOptions(max_bytes=100, names={"max_bytes": "--max-video-bytes"}))
    assert reason == "too_many_bytes" and "--max-video-bytes" in msg
    reason, _ = _reason(write_video(frames=10), options=VideoOptions(num_frames=2, max_decode_frames=3))
    assert reason == "too_many_frames"


def test_missing_file_passes_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "nope.mp4")
