"""Videos in chat: ``chat()`` with a decoded video, ``python -m mmkit.chat --video`` and ``/video``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")

import mmkit  # noqa: E402
from mmkit.chat import main as cli_main  # noqa: E402
from mmkit.infer.chat import build_chat_inputs, chat  # noqa: E402
from mmkit.processing.video import VideoOptions, decode_video  # noqa: E402
from tests.test_chat_cli import SPECIAL_IDS, save_image  # noqa: E402
from tests.videos import write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    """The tiny demo model with video support (video rows at id 0, spliced like images at inference)."""
    torch.manual_seed(0)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml", ["model.video_token_id=0"]).eval()
    with torch.no_grad():
        for i in SPECIAL_IDS:
            model.llm.lm_head.weight[i].zero_()
    path = tmp_path_factory.mktemp("video-model") / "tiny"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def video_model(video_model_dir):
    return mmkit.load(video_model_dir).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    write_video(path, frames=12, fps=6, size=(40, 32))
    return path


def test_chat_with_a_video_puts_its_rows_in_the_prompt(video_model, clip, tmp_path):
    video = decode_video(clip, VideoOptions(num_frames=3))
    reply, hist = chat(video_model, video, "what color ?", max_new_tokens=4)
    assert reply and hist.messages[0]["content"].startswith("<video>") and len(hist.videos) == 1
    inputs = build_chat_inputs(video_model, hist.messages[:1], hist.images, videos=hist.videos)
    n = int((inputs["input_ids"] == video_model.image_token_id).sum())
    assert n == video_model.processor.image_processor.num_video_tokens(3, 4) == inputs["image_features"].shape[0]
    # the features are the model's pooled video features
    expected = video_model.encode_videos(video_model.processor.process_videos([video.frames])["pixel_values_videos"])
    assert torch.allclose(inputs["image_features"], expected)
    # a second turn keeps the video; an image may follow it in a later turn
    img = save_image(tmp_path / "r.png")
    reply2, hist2 = chat(video_model, str(img), "and this ?", history=hist, max_new_tokens=3)
    assert len(hist2.videos) == 1 and len(hist2.images) == 1 and reply2


def test_a_model_without_video_support_says_so(tmp_path, clip):
    from tests.test_chat_cli import make_chat_model_dir

    d = make_chat_model_dir(tmp_path / "plain")
    with pytest.raises(ValueError, match="video_token_id"):
        chat(mmkit.load(d), decode_video(clip), "hi", max_new_tokens=2)


def test_cli_video_query_and_bad_videos(video_model, video_model_dir, clip, tmp_path, capsys, monkeypatch):
    expected, _ = chat(video_model, decode_video(clip, VideoOptions(num_frames=4)), "what color ?", max_new_tokens=4)
    rc = cli_main(["--model", str(video_model_dir), "--video", str(clip), "--video-frames", "4", "--query",
                   "what color ?", "--max-new-tokens", "4"])
    assert rc == 0 and capsys.readouterr().out.strip() == expected
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[:200])
    rc = cli_main(["--model", str(video_model_dir), "--video", str(broken), "--query", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --video {broken}:") and len(err.strip().splitlines()) == 1
    # interactive: a bad /video is one line and the session goes on; a good one resets the conversation
    script = "\n".join([f"/video {broken}", f"/video {tmp_path / 'none.mp4'}", f"/video {clip}", "what color ?",
                        "/exit"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli_main(["--model", str(video_model_dir), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot open video") == 2 and "new video" in out and "(8 frames of 2.00 s)" in out
    assert out.count("ASSISTANT: ") == 1
    # a bad --video in interactive mode: one error line, the chat still runs
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert cli_main(["--model", str(video_model_dir), "--video", str(broken), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "error: --video" in captured.err and captured.out.count("ASSISTANT: ") == 1


def test_cli_video_flags_are_checked(video_model_dir, clip, capsys):
    assert cli_main(["--model", str(video_model_dir), "--video", str(clip), "--video-frames", "0"]) == 2
    assert "--video-frames" in capsys.readouterr().err


def test_a_model_trained_with_the_time_instruction_gets_it_at_inference(tmp_path, clip):
    from mmkit.processing.video import time_instruction

    torch.manual_seed(0)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml", ["model.video_token_id=0", "data.video.time_instruction=true"])
    model.save(tmp_path / "timed")
    timed = mmkit.load(tmp_path / "timed").eval()
    video = decode_video(clip, VideoOptions(num_frames=3))
    got = build_chat_inputs(timed, [{"role": "user", "content": "<video>\nwhat color ?"}], videos=[video])
    # the same prompt with the instruction written out, as training puts it after the placeholder
    timed.recipe.data.video.time_instruction = False
    written = [{"role": "user", "content": f"<video>\n{time_instruction(video)}\nwhat color ?"}]
    assert torch.equal(got["input_ids"], build_chat_inputs(timed, written, videos=[video])["input_ids"])
    plain = build_chat_inputs(timed, [{"role": "user", "content": "<video>\nwhat color ?"}], videos=[video])
    assert plain["input_ids"].shape[1] < got["input_ids"].shape[1]  # off: no instruction
