"""video_url content parts in the server: data URLs decoded with the video module, bad videos are 400s."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("av")
pytest.importorskip("fastapi")

import mmkit  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from mmkit.infer.chat import chat  # noqa: E402
from mmkit.processing.video import VideoOptions, decode_video  # noqa: E402
from mmkit.serve.app import ServeConfig, create_app  # noqa: E402
from tests.test_chat_cli import make_chat_model_dir  # noqa: E402
from tests.test_video_chat import video_model, video_model_dir  # noqa: E402,F401 (fixtures)
from tests.videos import audio_only, write_video  # noqa: E402

CLIP = write_video(frames=12, fps=6, size=(40, 32))


def video_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(*parts, **kw):
    return {"model": "tiny", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": list(parts)}], **kw}


def vpart(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.fixture(scope="module")
def client(video_model):
    app = create_app(video_model, ServeConfig(model_name="tiny", video_frames=3, max_video_bytes=200_000,
                                              max_pixels=250_000))
    with TestClient(app) as c:
        yield c


def _error(resp, status, code):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code, err
    return err


def test_video_url_answers_like_chat(client, video_model):
    resp = client.post("/v1/chat/completions", json=body(vpart(video_url(CLIP)), {"type": "text",
                                                                                    "text": "what color ?"}))
    assert resp.status_code == 200, resp.text
    expected, _ = chat(video_model, decode_video(CLIP, VideoOptions(num_frames=3)), "what color ?",
                       max_new_tokens=4)
    assert resp.json()["choices"][0]["message"]["content"] == expected
    rows = video_model.processor.image_processor.num_video_tokens(3, 4)
    assert resp.json()["usage"]["prompt_tokens"] > rows


@pytest.mark.parametrize("url,status,code", [
    (video_url(b"not a video" * 20), 400, "invalid_video"),
    (video_url(audio_only()), 400, "invalid_video"),
    (video_url(CLIP[:300]), 400, "invalid_video"),
    (video_url(write_video(frames=2, size=(640, 480))), 400, "video_too_large"),  # 307200 px > max_pixels
    (video_url(b"\0" * 300_000), 400, "video_too_large"),
    ("data:video/mp4,abc", 400, "invalid_video_url"),
    ("file:///etc/passwd", 400, "invalid_video_url"),
    ("http://127.0.0.1:9/v.mp4", 400, "remote_videos_disabled"),
])
def test_bad_videos_are_400s(client, url, status, code):
    err = _error(client.post("/v1/chat/completions", json=body(vpart(url))), status, code)
    assert err["param"] == "messages[0].content[0].video_url"
    assert client.get("/health").status_code == 200  # still serving


def test_video_part_rules(client):
    two = body(vpart(video_url(CLIP)), vpart(video_url(CLIP)))
    _error(client.post("/v1/chat/completions", json=two), 400, "too_many_videos")
    text = body({"type": "text", "text": "a <video> here"})
    _error(client.post("/v1/chat/completions", json=text), 400, "invalid_value")
    sys_video = {"model": "tiny", "messages": [{"role": "system", "content": [vpart(video_url(CLIP))]},
                                                {"role": "user", "content": "hi"}]}
    _error(client.post("/v1/chat/completions", json=sys_video), 400, "invalid_value")


def test_a_model_without_video_support_is_a_400(tmp_path):
    model = mmkit.load(make_chat_model_dir(tmp_path / "plain")).eval()
    with TestClient(create_app(model, ServeConfig(model_name="tiny"))) as c:
        _error(c.post("/v1/chat/completions", json=body(vpart(video_url(CLIP)))), 400, "video_not_supported")


def test_remote_video_only_with_the_opt_in(video_model):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("content-length", str(len(CLIP)))
            self.end_headers()
            self.wfile.write(CLIP)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
    try:
        cfg = ServeConfig(model_name="tiny", video_frames=3, allow_remote_images=True)
        with TestClient(create_app(video_model, cfg)) as c:
            resp = c.post("/v1/chat/completions", json=body(vpart(url), {"type": "text", "text": "what color ?"}))
            assert resp.status_code == 200, resp.text
            small = ServeConfig(model_name="tiny", allow_remote_images=True, max_video_bytes=100)
        with TestClient(create_app(video_model, small)) as c:
            _error(c.post("/v1/chat/completions", json=body(vpart(url))), 400, "video_too_large")
    finally:
        server.shutdown()
