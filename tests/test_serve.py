"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1, the real ``openai`` client, raw httpx for errors."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

import mmkit
from mmkit.serve.app import ServeConfig, create_app, parse_size
from tests.helpers import wait_for_health
from tests.test_chat_cli import make_chat_model_dir

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
KEY = "sekret-key"
LIMITS = dict(max_images=2, max_image_bytes=200_000, max_pixels=250_000, queue_size=1, concurrency=1,
              default_temperature=0.0, max_tokens_limit=200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def png_bytes(size=(40, 30), color=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by garbage pixel data (never decodable)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data") + chunk(b"IEND", b"")


def user(*parts):
    content = []
    for p in parts:
        content.append({"type": "text", "text": p} if not p.startswith(("data:", "http", "file:", "ftp:"))
                       else {"type": "image_url", "image_url": {"url": p}})
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_chat_model_dir(tmp_path_factory.mktemp("serve-model") / "tiny")
    return mmkit.load(path).eval()


@pytest.fixture(scope="module")
def base(model):
    app = create_app(model, ServeConfig(model_name=NAME, **LIMITS))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def secure(model):
    """API key required, remote images allowed."""
    app = create_app(model, ServeConfig(model_name=NAME, api_key=KEY, allow_remote_images=True, **LIMITS))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(base, body, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        kw["json"] = body
    else:
        kw["content"] = body
    return httpx.post(base + "/v1/chat/completions", timeout=60, **kw)


def assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] is not None and param in err["param"], err
    return err


IMG = data_url(png_bytes())


# --------------------------------------------------------------------------- happy paths, real openai client


def test_health_and_models(base, client):
    assert httpx.get(base + "/health").json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_completion_with_image(client, model):
    resp = client.chat.completions.create(
        model=NAME, messages=[user(IMG, "what color is the shape ?")], max_tokens=6, temperature=0)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the fixture model never says eos
    n_img = model.processor.num_image_tokens((30, 40))
    assert resp.usage.completion_tokens == 6
    assert resp.usage.prompt_tokens_details.image_tokens == n_img
    assert resp.usage.prompt_tokens > n_img
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6
    # the same answer as model.chat (same template, greedy)
    reply, _ = model.chat(Image.open(io.BytesIO(png_bytes())), "what color is the shape ?", max_new_tokens=6)
    assert choice.message.content == reply


def test_streaming_matches_non_streaming(client):
    msgs = [user(IMG, "what color ?")]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1
    assert "".join(content) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(base):
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        obj = json.loads(line[6:])
        assert obj["object"] == "chat.completion.chunk" and "usage" not in obj  # no include_usage


def test_multi_turn_with_system_and_plain_string_content(client):
    resp = client.chat.completions.create(model=NAME, max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": "You answer shortly."},
        user(IMG, "what color ?"),
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the shape ?"},
    ])
    assert resp.choices[0].message.content


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model=NAME, messages=[user(IMG, "what color ?")], max_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_strings(client):
    free = client.chat.completions.create(model=NAME, messages=[user(IMG, "what color ?")], max_tokens=8,
                                          temperature=0).choices[0].message.content
    words = free.split(" ")
    stop = words[2]
    resp = client.chat.completions.create(model=NAME, messages=[user(IMG, "what color ?")], max_tokens=8,
                                          temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == free[: free.index(stop)].strip()


# --------------------------------------------------------------------------- errors: status and OpenAI shape


@pytest.mark.parametrize("body,status,code,param", [
    (b"{not json", 400, "invalid_json", None),
    (b"\xff\xfe", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter", "model"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
    ({"model": NAME, "messages": []}, 400, None, "messages"),
    ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, None, "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, None, "type"),
    ({"model": NAME, "messages": [{"role": "user", "content": "look: <image>"}]}, 400, None, "text"),
    ({"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_conversation", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "invalid_conversation", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, None, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, None,
     "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, 400, None, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 201}, 400, None,
     "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, None, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, None, "top_p"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None, "n"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, None, "stop"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, None, "stream"),
])
def test_request_errors(base, body, status, code, param):
    assert_error(post(base, body, headers={"content-type": "application/json"}), status, code, param)


def _image_request(url: str, n: int = 1) -> dict:
    return {"model": NAME, "messages": [user(*([url] * n), "what is it ?")], "max_tokens": 2}


@pytest.mark.parametrize("url,code", [
    ("data:image/png;base64,!!!not-base64!!!", "invalid_base64"),
    ("data:image/png;base64,iVBORw0KGgo=x", "invalid_base64"),
    ("data:image/png,rawbytes", "invalid_image_url"),
    ("data:image/png;base64,", "invalid_image"),
    (data_url(b"this is not an image at all" * 10), "invalid_image_format"),
    (data_url(png_bytes()[:60]), "invalid_image"),  # a real PNG header, truncated pixel data
    (data_url(png_bytes(fmt="BMP"), "image/bmp"), "invalid_image_format"),
    (data_url(os.urandom(300_000)), "image_too_large"),  # more bytes than --max-image-bytes
    (data_url(png_bytes(size=(600, 600))), "image_too_large"),  # 360k pixels > --max-pixels 250k
    ("file:///etc/passwd", "invalid_image_url"),
    ("ftp://example.com/x.png", "invalid_image_url"),
    ("http://127.0.0.1:9/x.png", "remote_images_disabled"),
])
def test_image_errors(base, url, code):
    err = assert_error(post(base, _image_request(url)), 400, code, "image_url")
    assert "messages[0].content[0]" in err["param"]


def test_decompression_bomb_is_refused_from_the_header(base, monkeypatch):
    """Huge dimensions in a few bytes: refused by size before any pixel is decoded (the data is garbage)."""
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    for w, h in [(600, 600), (20_000, 20_000), (100_000, 100_000)]:  # ours, ours, beyond PIL's own bomb limit
        err = assert_error(post(base, _image_request(data_url(png_header_only(w, h)))), 400, "image_too_large")
        assert "pixels" in err["message"]
    assert decoded == []  # Image.load never ran for any of them
    # the same garbage under the limit gets past the size check and fails at decoding instead
    assert_error(post(base, _image_request(data_url(png_header_only(100, 100)))), 400, "invalid_image")
    assert decoded == [(100, 100)]


def test_too_many_images(base):
    assert_error(post(base, _image_request(IMG, n=3)), 400, "too_many_images", "messages")


def test_images_only_in_user_messages(base):
    body = {"model": NAME, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": IMG}}]},
        {"role": "user", "content": "ok"}]}
    assert_error(post(base, body), 400, None, "messages[1]")


def test_body_too_large_is_413(base):
    body = b'{"model": "tiny", "messages": [], "pad": "' + b"x" * 5_200_000 + b'"}'
    assert_error(post(base, body), 413, "request_too_large")

    def chunked():  # no content-length header: the limit is enforced while reading
        yield body[:1000]
        yield body[1000:]

    assert_error(post(base, chunked()), 413, "request_too_large")


def test_unknown_route_and_method(base):
    assert_error(httpx.get(base + "/v1/nothing"), 404)
    assert_error(httpx.get(base + "/v1/chat/completions"), 405)
    assert_error(httpx.get(base + "/v1/models/nope"), 404, "model_not_found")


def test_openai_client_maps_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=NAME, messages=[user("data:image/png;base64,@@@", "hi")])
    assert exc.value.code == "invalid_base64"


def test_internal_errors_are_500_and_logged(base, client, monkeypatch, caplog):
    from mmkit.infer.engine import Engine

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(Engine, "_forward", boom)  # every forward pass of the batching engine fails
    with caplog.at_level(logging.ERROR, logger="mmkit.serve"):
        err = assert_error(post(base, {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}), 500)
        assert "secret internals" not in err["message"] and err["type"] == "server_error"
        with pytest.raises(openai.APIError):  # an error event inside the stream
            for _ in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3, stream=True):
                pass
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) >= 2 and all("secret internals" in str(r.exc_info[1]) for r in logged)


def test_still_serving_after_errors(base, client):
    post(base, b"{bad")
    post(base, _image_request("data:image/png;base64,@@"))
    resp = client.chat.completions.create(model=NAME, messages=[user(IMG, "what color ?")], max_tokens=3)
    assert resp.choices[0].message.content
    assert httpx.get(base + "/health").json()["in_flight"] == 0


# --------------------------------------------------------------------------- concurrency


def _slow_body(tokens=190, stream=False):
    return {"model": NAME, "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": tokens,
            "stream": stream}


def test_queue_full_answers_429_and_the_loop_stays_responsive(base):
    results, health_times = [], []

    def call():
        results.append(post(base, _slow_body()))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    # while generation runs in worker threads, the event loop answers at once
    for _ in range(3):
        t0 = time.perf_counter()
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        health_times.append(time.perf_counter() - t0)
    for t in threads:
        t.join(timeout=120)
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 2  # concurrency 1 + queue 1 fit
    assert statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    for r in results:
        if r.status_code == 429:
            assert_error(r, 429, "server_overloaded")
            assert r.headers.get("retry-after") == "1"
        else:
            assert r.json()["usage"]["completion_tokens"] == 190
    assert max(health_times) < 1.0, health_times
    assert httpx.get(base + "/health").json()["in_flight"] == 0


def test_client_disconnect_stops_generation_and_frees_the_slot(base, monkeypatch):
    from mmkit.infer.engine import Engine

    streams = []
    real = Engine.submit

    def spy(self, *a, **k):
        streams.append(real(self, *a, **k))
        return streams[-1]

    monkeypatch.setattr(Engine, "submit", spy)
    with httpx.stream("POST", base + "/v1/chat/completions", json=_slow_body(190, stream=True), timeout=60) as r:
        assert r.status_code == 200
        for _ in zip(range(3), r.iter_lines()):
            pass
    deadline = time.time() + 20
    while httpx.get(base + "/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(base + "/health").json()["in_flight"] == 0
    assert len(streams) == 1
    assert streams[0].done.wait(20) and streams[0].cancelled
    assert streams[0].finish_reason is None and streams[0].completion_tokens < 190  # closed early
    assert httpx.get(base + "/health").json()["running"] == 0  # the slot is free


# --------------------------------------------------------------------------- api key, remote images


def test_api_key(secure):
    hi = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_error(post(secure, hi), 401, "missing_api_key")
    assert_error(post(secure, hi, headers={"authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(post(secure, hi, headers={"authorization": "Basic " + KEY}), 401)
    assert_error(httpx.get(secure + "/v1/models"), 401)
    assert httpx.get(secure + "/health").status_code == 200  # health checks need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secure + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=secure + "/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(**hi).choices[0].message.content


@pytest.fixture(scope="module")
def image_host():
    png = png_bytes(size=(20, 20), color=(0, 255, 0))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("location", "file:///etc/passwd")
                self.end_headers()
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 300_000)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_images_when_allowed(secure, image_host):
    headers = {"authorization": f"Bearer {KEY}"}
    ok = post(secure, _image_request(image_host + "/ok.png"), headers=headers)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert_error(post(secure, _image_request(image_host + "/missing.png"), headers=headers), 422,
                 "image_fetch_failed", "image_url")
    assert_error(post(secure, _image_request(image_host + "/to-file"), headers=headers), 422, "image_fetch_failed")
    assert_error(post(secure, _image_request(image_host + "/big"), headers=headers), 400, "image_too_large")
    assert_error(post(secure, _image_request("file:///etc/passwd"), headers=headers), 400, "invalid_image_url")


# --------------------------------------------------------------------------- the command line


def test_parse_size():
    assert parse_size("20MB") == 20_000_000
    assert parse_size("20MiB") == 20 * 1024 * 1024
    assert parse_size("512k") == 512_000
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_python_m_mmkit_serve(model, tmp_path):
    """The real entry point in a subprocess: --help, then serve, answer, shut down."""
    model_dir = tmp_path / "m"
    model.save(model_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    helped = subprocess.run([sys.executable, "-m", "mmkit.serve", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert helped.returncode == 0
    for flag in ("--api-key", "--max-images", "--max-image-bytes", "--max-pixels", "--queue-size", "--concurrency",
                 "--max-batch-size", "--max-batch-tokens", "--image-cache-size", "--log-prompts",
                 "--allow-remote-images", "--ui", "--load-4bit", "--load-8bit"):
        assert flag in helped.stdout
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmkit.serve", "--model", str(model_dir), "--port", str(port),
                             "--model-name", "cli-model", "--max-image-bytes", "1MB", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_health(proc, base)
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        resp = c.chat.completions.create(model="cli-model", messages=[user(IMG, "what color ?")], max_tokens=3,
                                          temperature=0)  # greedy: a sampled first token can be a stop token
        assert resp.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
