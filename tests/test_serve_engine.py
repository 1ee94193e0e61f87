"""The server on the batching engine: exact streaming through the real ``openai`` client, concurrent
mixed load identical to requests alone, /metrics and the per-request log line."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time

import httpx
import pytest
from PIL import Image

from mmkit.infer.chat import build_chat_inputs, stop_options
from mmkit.infer.generate import generate
from mmkit.serve.app import ServeConfig, create_app
from tests.test_engine import byte_model
from tests.test_serve import data_url, png_bytes, running_server

openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

NAME = "bytes"
IMG = data_url(png_bytes())
IMG2 = data_url(png_bytes((30, 50), (0, 0, 255)))


@pytest.fixture(scope="module")
def model():
    return byte_model(seed=1)


@pytest.fixture(scope="module")
def base(model):
    app = create_app(model, ServeConfig(model_name=NAME, concurrency=4, queue_size=16, default_temperature=0.0,
                                        max_batch_tokens=48))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


def _msgs(text, *images):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


CASES = [("héllo wörld", (IMG,), 7, None), ("你好世界", (), 9, None),
         ("🙂🚀👍 " * 6, (IMG, IMG2), 13, None),
         ("the quick brown fox " * 5, (), 5, None), ("café naïve", (IMG2,), 20, "stop"),
         ("ünïcödé", (), 11, "stop"), ("こんにちは", (IMG,), 3, None), ("ß ∑ ≥ → ✓", (), 17, None),
         ("ą ę", (IMG,), 8, "stop")]


def _complete(client, text, images, max_tokens, stop, stream):
    kw = {"model": NAME, "messages": _msgs(text, *images), "max_tokens": max_tokens, "temperature": 0}
    if stop is not None:
        kw["stop"] = [stop]
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    deltas, finish, usage = [], None, None
    for ch in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            deltas.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(deltas), finish, usage


def _stops(client, model):
    """A stop string per 'stop' case: 2-3 characters from the middle of its free-running answer."""
    out = {}
    for k, (text, images, max_tokens, stop) in enumerate(CASES):
        if stop is None:
            continue
        full, _, _ = _complete(client, text, images, 30, None, False)
        out[k] = next((full[a:a + 2] for a in range(3, len(full) - 2) if "\ufffd" not in full[a:a + 2]
                       and full[a:a + 2].strip() == full[a:a + 2]), None)
    return out


def test_streamed_equals_non_streamed_concurrently(client, model):
    stops = _stops(client, model)
    results = {}

    def run(k, stream):
        text, images, max_tokens, _ = CASES[k]
        results[(k, stream)] = _complete(client, text, images, max_tokens, stops.get(k), stream)

    threads = [threading.Thread(target=run, args=(k, s)) for k in range(len(CASES)) for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 2 * len(CASES)
    replacement = 0
    for k in range(len(CASES)):
        plain, streamed = results[(k, False)], results[(k, True)]
        assert streamed[0] == plain[0], (k, streamed[0], plain[0])
        assert streamed[1] == plain[1]
        assert streamed[2].completion_tokens == plain[2].completion_tokens
        # the same prompt twice: the later one may copy the earlier one's prompt keys/values (never all of it)
        for res in (plain, streamed):
            assert 0 <= res[2].prompt_tokens_details.cached_tokens < res[2].prompt_tokens
        replacement += "\ufffd" in plain[0]
        if stops.get(k) is not None:
            assert plain[1] == "stop" and stops[k] not in plain[0]
    assert any(r[2].prompt_tokens_details.cached_tokens for r in results.values())
    assert replacement  # random bytes: some answers contain undecodable bytes, decided the same both ways


def test_concurrent_requests_match_running_alone(client, model, base):
    results = {}

    def run(k):
        text, images, max_tokens, _ = CASES[k]
        results[k] = _complete(client, text, images, max_tokens, None, k % 2 == 1)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(CASES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    # alone: the plain decoding loop on the same prompt, one request at a time
    app_cfg = ServeConfig(model_name=NAME)

    def pil(url):  # the PNG the server decodes
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")

    for k, (text, images, max_tokens, _) in enumerate(CASES):
        content = "".join("<image>\n" for _ in images) + text
        inputs = build_chat_inputs(model, [{"role": "user", "content": content}], [pil(u) for u in images],
                                   app_cfg.template, app_cfg.system)
        res = generate(model, **inputs, max_new_tokens=max_tokens, return_dict=True, **stop_options(model))
        assert results[k][2].completion_tokens == len(res.token_ids[0])
        assert results[k][0] == res.texts[0].strip(), (k, results[k][0], res.texts[0])
    assert httpx.get(base + "/health").json()["running"] == 0


def test_metrics(base, client):
    client.chat.completions.create(model=NAME, messages=_msgs("hi", IMG), max_tokens=4)
    client.chat.completions.create(model=NAME, messages=_msgs("hi again", IMG), max_tokens=4)
    httpx.post(base + "/v1/chat/completions", json={"model": "nope", "messages": []})
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("mmkit_requests_total{status=\"200\"}", "mmkit_requests_total{status=\"404\"}",
                 "mmkit_queue_depth", "mmkit_running_requests", "mmkit_decode_batch_size",
                 "mmkit_prompt_tokens_total", "mmkit_generation_tokens_total",
                 "mmkit_time_to_first_token_seconds_bucket", "mmkit_time_per_output_token_seconds_bucket",
                 "mmkit_image_cache_hits_total", "mmkit_image_cache_misses_total", "mmkit_request_finish_total"):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["mmkit_image_cache_hits_total"] >= 1
    assert values["mmkit_generation_tokens_total"] >= 8
    assert values["mmkit_running_requests"] == 0


def test_one_log_line_per_request_without_the_prompt(base, client, caplog):
    with caplog.at_level(logging.INFO, logger="mmkit.serve"):
        r = client.chat.completions.create(model=NAME, messages=_msgs("a very secret prompt"), max_tokens=3)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "mmkit.serve" and "status=" in
             rec.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "status=200" in line and "completion_tokens=3" in line and "latency=" in line
    assert "secret" not in line and r.id in line


def test_prompt_logging_on_request(model, caplog):
    app = create_app(model, ServeConfig(model_name=NAME, log_prompts=True, default_temperature=0.0))
    with running_server(app) as url, caplog.at_level(logging.INFO, logger="mmkit.serve"):
        httpx.post(url + "/v1/chat/completions", json={"model": NAME, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "my words"}]},
                   timeout=60)
    assert any("my words" in rec.getMessage() for rec in caplog.records)


def test_mixed_good_bad_and_abandoned_requests_under_load(model):
    """Nothing turns into a 500 or a hang; every admitted request completes; the slots come back."""
    app = create_app(model, ServeConfig(model_name=NAME, concurrency=3, queue_size=4, default_temperature=0.0,
                                        max_batch_tokens=32, max_images=2))
    good = {"model": NAME, "max_tokens": 6, "messages": _msgs("héllo", IMG)}
    bodies = [good, {**good, "stream": True}, {"model": NAME, "messages": "nope"}, b"{not json",
              {**good, "max_tokens": -3}, {"model": NAME, "messages": _msgs("x", "data:image/png;base64,@@")},
              {**good, "messages": _msgs("three", IMG, IMG, IMG)}, {**good, "stop": ["é", "l"], "stream": True},
              {**good, "temperature": 0.9, "seed": 3}, {**good, "stream": True, "abandon": True}]
    statuses = []
    with running_server(app) as url:
        def send(body):
            try:
                if isinstance(body, dict) and body.get("abandon"):
                    body = {k: v for k, v in body.items() if k != "abandon"}
                    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                        statuses.append(r.status_code)
                        next(r.iter_lines(), None)  # then hang up
                    return
                if isinstance(body, bytes):
                    r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60)
                else:
                    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                statuses.append(r.status_code)
                if r.status_code == 200 and body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]")
            except Exception as exc:  # noqa: BLE001 - recorded; the assertion below names it
                statuses.append(repr(exc))

        threads = [threading.Thread(target=send, args=(bodies[k % len(bodies)],)) for k in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert len(statuses) == 30 and set(statuses) <= {200, 400, 429}, statuses
        assert statuses.count(200) >= 7
        deadline = time.time() + 20
        while httpx.get(url + "/health").json()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health").json()
        assert health["in_flight"] == 0 and health["running"] == 0 and health["queued"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert 'mmkit_requests_total{status="500"}' not in metrics


def test_a_non_streamed_client_that_hangs_up_is_freed_and_does_not_block_the_next(model, caplog):
    """One slot; a non-streamed request whose client goes away stops generating (cancelled, logged as
    client_gone, counted in the metrics) and the next request gets the slot and completes."""
    app = create_app(model, ServeConfig(model_name=NAME, concurrency=1, queue_size=2, default_temperature=0.0))
    batcher = app.state.engine.batcher
    forward = batcher._forward

    def slow_forward(*args, **kwargs):  # a step of a real model: the request outlives its client
        time.sleep(0.02)
        return forward(*args, **kwargs)

    batcher._forward = slow_forward
    gone = {"model": NAME, "max_tokens": 200, "messages": _msgs("tell me everything", IMG)}
    with running_server(app) as url, caplog.at_level(logging.INFO, logger="mmkit.serve"):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(url + "/v1/chat/completions", json={**gone, "ignore_eos": True}, timeout=1.0)
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": NAME, "max_tokens": 3, "messages": _msgs("next", IMG)})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        health = httpx.get(url + "/health").json()
        assert health["running"] == 0 and health["queued"] == 0 and health["in_flight"] == 0
        metrics = httpx.get(url + "/metrics").text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "mmkit.serve" and "status=" in
             rec.getMessage()]
    assert len(lines) == 2, lines
    first = lines[0]
    assert "status=client_gone" in first and "finish=cancelled" in first, first
    done = int(first.split("completion_tokens=")[1].split()[0])
    assert done < 200, first  # freed long before max_tokens: the slot came back for the next request
    assert "status=200" in lines[1]
    assert 'mmkit_request_finish_total{reason="cancelled"} 1.0' in metrics
