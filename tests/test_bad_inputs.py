"""A corpus of careless and hostile inputs -- recipes, data, checkpoints, targets -- each with its exit code and
message: a user mistake is one line (`error: WHERE: WHAT`) and exit 2, never a traceback, never a silent success.

The server's cases go through the real app (FastAPI's TestClient, server exceptions answered as 500s, not raised):
every client mistake is a 400 naming the field; tests/test_serve.py holds the rest of the request corpus.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import mmkit
from mmkit.train.__main__ import main as train_main
from tests.helpers import wait_for_health

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def dry_run(capsys, recipe: str, *overrides: str) -> tuple[int, str, str]:
    code = train_main([recipe, *overrides, "--dry-run"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


RECIPE_CASES = [
    # (recipe text or None for tiny.yaml, overrides, message)
    ("{}\n", (), "stages: the recipe has no stages, so there is nothing to train"),
    ("stages: [{}]\n", (), "model.vision: set pretrained (a hub id or local directory) or config"),
    ("model: {vision: {config: {hidden_size: 8}}}\nstages: [{}]\n", (),
     "model.llm: set pretrained (a hub id or local directory)"),
    (None, ("stages[0].per_device_batch_size=0",), "stages[0].per_device_batch_size: expected a positive integer, got 0"),
    (None, ("stages[1].global_batch_size=0",), "stages[1].global_batch_size: expected a positive integer, got 0"),
    (None, ("stages[0].per_device_batch_size=-4",), "stages[0].per_device_batch_size: expected a positive integer"),
    (None, ("stages[1].lr.llm=fast",), "stages[1].lr.llm: expected a number or null, got 'fast'"),
    (None, ("stages[0].max_steps=0",), "stages[0].max_steps: expected a positive integer (or null for epochs), got 0"),
    (None, ("stages[0].max_steps=-3",), "stages[0].max_steps: expected a positive integer"),
    (None, ("stages[0].warmup_ratio=-1",), "stages[0].warmup_ratio: expected a number in [0, 1), got -1.0"),
    (None, ("stages=[]",), "stages: the recipe has no stages, so there is nothing to train"),
    (None, ("=5",), "override '=5': expected key.path=value (the key is empty)"),
    (None, ("model.max_length.x=1",), "override 'model.max_length.x=1': model.max_length is 256, not a mapping"),
    (None, ("model.llm.config.hidden_sise=128",),
     "model.llm.config.hidden_sise: not a field of a llama config; did you mean 'hidden_size'?"),
    (None, ("model.vision.config.num_hiden_layers=1",),
     "model.vision.config.num_hiden_layers: not a field of CLIPVisionConfig; did you mean 'num_hidden_layers'?"),
    (None, ("model.vision.config.num_hidden_layers=-1",),
     "model.vision.config.num_hidden_layers: expected a positive integer, got -1"),
    (None, ("model.llm.tokenizer=/nonexistent/tokenizer",),
     "model.llm.tokenizer: tokenizer directory '/nonexistent/tokenizer' does not exist"),
    (None, ("model.conector.name=linear",), "model.conector: unknown key; did you mean 'connector'?"),
    (None, ("plugins.shpes_demo.train_images=3",), "plugins.shpes_demo: unknown plugin"),
    ("base: [42]\n", (), "base: expected a recipe file name (or a list of them), got 42"),
    ("base: [missing.yaml]\n", (), "missing.yaml: recipe file not found"),
    ("stages: [{lr: {connector: 1e-3}, trainable: {llm: full}}]\n", (),
     "stages[0].lr.llm: missing learning rate for a trainable part"),
    ("- just\n- a list\n", (), "a recipe is a mapping at the top level, got list"),
    ("model: {vision: [1\n", (), "not valid YAML"),
]


@pytest.mark.parametrize("text,overrides,message", RECIPE_CASES)
def test_recipe_mistakes_are_one_line_exit_2(tmp_path, capsys, text, overrides, message):
    recipe = TINY
    if text is not None:
        recipe = str(tmp_path / "r.yaml")
        Path(recipe).write_text(text)
    code, _, err = dry_run(capsys, recipe, *overrides)
    assert code == 2 and message in err and err.startswith("error: ") and "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_yaml_string_learning_rate_is_a_number_in_dry_run(capsys):
    code, out, err = dry_run(capsys, TINY, "stages[1].lr.llm='2e-3'")  # YAML reads 2e-3 as a string
    assert code == 0, err
    assert "lr 0.002" in out


# --------------------------------------------------------------------------- checkpoints and targets


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "m"
    mmkit.build(TINY).save(out)
    return out


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmkit.convert", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _broken(saved: Path, tmp_path: Path, how: str) -> Path:
    d = Path(shutil.copytree(saved, tmp_path / "broken"))
    if how == "truncated weights":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:777])
    elif how == "bad mmkit.json":
        (d / "mmkit.json").write_text("{oops")
    elif how == "list config.json":
        shutil.rmtree(d)
        d.mkdir()
        (d / "config.json").write_text("[]")
    elif how == "missing tensor":
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "model.safetensors"))
        t.pop(sorted(t)[0])
        save_file(t, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("how,message", [
    ("truncated weights", "model.safetensors: not a readable safetensors file"),
    ("bad mmkit.json", "mmkit.json: not valid JSON"),
    ("list config.json", "config.json: expected a JSON object, got list"),
    ("missing tensor", "model.safetensors does not fit the recipe: missing ["),
])
def test_broken_checkpoints_name_the_file(saved, tmp_path, how, message):
    src = _broken(saved, tmp_path, how)
    run = convert(src, tmp_path / "out", "--to", "llava-hf")
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_convert_into_a_users_folder_keeps_it(saved, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.md").write_text("mine")
    for extra in ([], ["--overwrite"]):
        run = convert(saved, home, "--to", "mmkit", *extra)
        assert run.returncode == 2 and "holds files mmkit did not write (notes.md)" in run.stderr
    assert [p.name for p in home.iterdir()] == ["notes.md"] and (home / "notes.md").read_text() == "mine"


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_a_weight_index_pointing_outside_its_directory_is_refused(saved, tmp_path, shard):
    import json

    out = tmp_path / "hf"
    mmkit.load(saved).save(out, format="llava-hf")
    (out / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    run = convert(out, tmp_path / "back", "--to", "mmkit")
    assert run.returncode == 2 and f"shard {shard!r} is not a file name inside" in run.stderr


def test_eval_answers_cannot_be_the_question_file(saved, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "hi"}\n')
    run = subprocess.run([sys.executable, "-m", "mmkit.eval", "--model", str(saved), "--questions", str(q),
                          "--answers", str(q)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "is the question file" in run.stderr
    assert q.read_text() == '{"question_id": 1, "text": "hi"}\n'


# --------------------------------------------------------------------------- server requests (the real app)


@pytest.fixture(scope="module")
def server_model():
    from tests.test_engine import byte_model

    return byte_model(seed=1)


@contextmanager
def _app_client(model, **cfg):
    """The real app in-process; its engine's scheduler thread is stopped afterwards."""
    from fastapi.testclient import TestClient

    from mmkit.serve.app import ServeConfig, create_app

    app = create_app(model, ServeConfig(model_name="bytes", default_temperature=0.0, **cfg))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, app.state.engine
    finally:
        app.state.engine.batcher.close()


@pytest.fixture(scope="module")
def api(server_model):
    with _app_client(server_model) as pair:
        yield pair


def _post(client, raw: bytes | dict):
    import json

    body = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})


def _err(resp, status: int, param: str | None, words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    return err


HI = '{"model": "bytes", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3'

REQUEST_CASES = [
    # (raw JSON body, param, words in the message)
    (HI.replace('"hi"', '"\\ud800"') + "}", "messages[0].content", "lone surrogate"),
    ('{"model": "bytes", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}',
     "messages[0].content[0].text", "lone surrogate"),
    (HI + ', "stop": ["ok", "\\ud800"]}', "stop[1]", "lone surrogate"),
    ('{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model", "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, None, "nested more than 64 levels"),
    (HI + ', "x": ' + "[" * 70 + "]" * 70 + "}", None, "nested more than 64 levels"),
    (HI + ', "max_tokens": ' + "[" * 60 + "]" * 60 + "}", "max_tokens", "must be an integer, got an array"),
    (HI + ', "max_tokens": 1' + "0" * 5000 + "}", None, "could not parse the JSON body"),
    (HI + ', "top_p": NaN}', "top_p", "must be a finite number, got nan"),
    (HI + ', "top_p": Infinity}', "top_p", "must be a finite number, got inf"),
    (HI + ', "temperature": NaN}', "temperature", "must be a finite number"),
    (HI + ', "temperature": -Infinity}', "temperature", "must be a finite number"),
    (HI + ', "top_p": 1.5}', "top_p", "must be in (0, 1]"),
    (HI + ', "temperature": -0.1}', "temperature", "must be in [0, 2]"),
    (HI + ', "top_k": -1}', "top_k", "must be in [0, "),
    (HI + ', "top_k": 2.5}', "top_k", "must be an integer"),
    (HI + ', "seed": 1e400}', "seed", "must be an integer"),
    (HI + ', "presence_penalty": NaN}', "presence_penalty", "must be a finite number"),
    (HI + ', "frequency_penalty": 3}', "frequency_penalty", "must be in [-2, 2]"),
    (HI + ', "stream": true, "stream_options": {"include_usage": NaN}}', "stream_options.include_usage",
     "must be a boolean, got NaN"),
    (HI + ', "stream_options": []}', "stream_options", "must be an object"),
]


@pytest.mark.parametrize("raw,param,words", REQUEST_CASES)
def test_request_mistakes_are_400_naming_the_field(api, raw, param, words):
    _err(_post(api[0], raw.encode()), 400, param, words)


def test_no_max_tokens_generates_up_to_the_rest_of_the_context(api):
    client, engine = api
    prompt = "hi " * ((engine.context_length - 100) // 3)  # leaves less room than the default 512
    r = _post(client, {"model": "bytes", "messages": [{"role": "user", "content": prompt}], "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == engine.context_length
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # an explicit max_tokens that does not fit stays a 400
    r = _post(client, {"model": "bytes", "messages": [{"role": "user", "content": prompt}], "max_tokens": 200})
    _err(r, 400, "messages", "maximum context length")
    # a prompt that fills the context leaves no room even for the default
    full = "hi " * engine.context_length
    _err(_post(client, {"model": "bytes", "messages": [{"role": "user", "content": full}]}), 400, "messages",
         "leaves no room")


def _stream_text(client, body: dict) -> tuple[str, str]:
    import json

    deltas, finish = [], None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    deltas.append(c["delta"].get("content") or "")
                    finish = c["finish_reason"] or finish
    return "".join(deltas), finish


def test_streamed_equals_non_streamed_on_32_pairs(api):
    """Greedy pairs on a random byte-level model: its answers have leading, inner and trailing whitespace."""
    import random

    client, _ = api
    rng = random.Random(0)
    words = ["a", " ", "  ", "\n", "\t", "é", "你", "🙂", "the", "x y", ".", "?"]
    edges = 0
    for k in range(32):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12))) or "hi"
        body = {"model": "bytes", "messages": [{"role": "user", "content": text}], "temperature": 0,
                "max_tokens": rng.randint(1, 24)}
        if k % 4 == 3:
            body["stop"] = [" ", "\n"][k % 8 // 4]  # a whitespace stop string
        r = _post(client, body)
        assert r.status_code == 200, r.text
        plain = r.json()["choices"][0]
        streamed, finish = _stream_text(client, body)
        assert streamed == plain["message"]["content"], (k, streamed, plain)
        assert finish == plain["finish_reason"]
        edges += plain["message"]["content"] != plain["message"]["content"].strip() or not plain["message"]["content"]
    assert edges == 0  # both paths strip: no text starts or ends in whitespace


# --------------------------------------------------------------------------- the image budget (issue item 2)


def black_png(width: int, height: int) -> bytes:
    """An all-black 8-bit grey PNG: a few bytes that claim width x height pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _image_body(data: bytes) -> dict:
    import base64

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"model": "bytes", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]}]}


@pytest.fixture(scope="module")
def pad_model():
    from tests.byte_tokenizer import byte_level_tokenizer

    model = mmkit.build(TINY, overrides=["model.image.aspect_ratio=pad"], tokenizer=byte_level_tokenizer()).eval()
    assert model.image_spec.aspect_ratio == "pad"
    return model


SERVER_IMAGE_CASES = [
    # (width, height, encoded bytes, model, extra server settings, words in the message)
    (4_000_000, 1, 3955, "square", {}, "aspect ratio of 4000000:1, the limit is 50:1 (raise it with --max-image-aspect)"),
    (200_000, 1, 274, "square", {}, "aspect ratio of 200000:1, the limit is 50:1 (raise it with --max-image-aspect)"),
    (200_000, 1, 274, "square", {"max_image_aspect": 1e9},  # resized to tile height: 32 x 6,400,000
     "becomes 204800000 pixels after resize/pad (square), the limit is 100000000 pixels (raise it with "
     "--max-resized-pixels)"),
    (20_000, 1, 99, "pad", {}, "aspect ratio of 20000:1, the limit is 50:1 (raise it with --max-image-aspect)"),
    (20_000, 1, 99, "pad", {"max_image_aspect": 1e9},  # padded to a 20,000 x 20,000 square first
     "becomes 400000000 pixels after resize/pad (pad), the limit is 100000000 pixels (raise it with "
     "--max-resized-pixels)"),
    (13_000, 13_000, 164_114, "pad", {},
     "13000x13000 = 169000000 pixels, the limit is 50000000 pixels (raise it with --max-pixels)"),
    (300, 200, None, "square", {"max_image_bytes": 100}, "100 bytes (raise it with --max-image-bytes)"),
]


@pytest.mark.parametrize("width,height,size,kind,settings,words", SERVER_IMAGE_CASES)
def test_server_image_budget_is_a_400_naming_the_flag(server_model, pad_model, width, height, size, kind, settings,
                                                      words):
    data = black_png(width, height)
    assert size is None or len(data) == size
    with _app_client(server_model if kind == "square" else pad_model, **settings) as (client, _):
        err = _err(_post(client, _image_body(data)), 400, "messages[0].content[0].image_url", words)
    assert err["code"] == "image_too_large"


def test_server_image_budget_allows_real_images(server_model, pad_model):
    with _app_client(server_model) as (square, _), _app_client(pad_model) as (pad, _):
        for w, h in [(8064, 6048), (640, 480)]:  # a 48 MP photo (its pad square is 65 MP), VGA
            assert _post(pad, _image_body(black_png(w, h))).status_code == 200
        # a long screenshot: its shortest-edge resize is small; its pad square (400 MP) is not
        assert _post(square, _image_body(black_png(1080, 20_000))).status_code == 200
        _err(_post(pad, _image_body(black_png(1080, 20_000))), 400, "messages[0].content[0].image_url",
             "--max-resized-pixels")


def test_image_limits_flags_and_their_checks(tmp_path):
    from mmkit.processing.budget import ImageLimitError, ImageLimits

    with pytest.raises(ValueError, match="--max-image-aspect: expected a number >= 1"):
        ImageLimits(max_aspect=0.5)
    with pytest.raises(ValueError, match="--max-pixels: expected a positive number, got 0"):
        ImageLimits(max_pixels=0)
    path = tmp_path / "wide.png"
    path.write_bytes(black_png(200_000, 1))
    with pytest.raises(ImageLimitError, match="raise it with --max-image-aspect"):
        ImageLimits().open(path)
    assert ImageLimits(max_aspect=1e6).open(path).size == (200_000, 1)  # no model: no resize to check


def test_chat_cli_refuses_an_image_over_the_budget(saved, tmp_path):
    big = tmp_path / "wide.png"
    big.write_bytes(black_png(4_000_000, 1))
    run = subprocess.run([sys.executable, "-m", "mmkit.chat", "--model", str(saved), "--image", str(big), "--query",
                          "hi"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"error: --image {big}: image is too large: 4000000x1" in run.stderr
    assert "(raise it with --max-image-aspect)" in run.stderr


def test_eval_skips_a_question_whose_image_is_over_the_budget(saved, tmp_path):
    from mmkit.eval.runner import answer_to_file
    from mmkit.processing.budget import ImageLimits

    (tmp_path / "ok.png").write_bytes(black_png(40, 30))
    (tmp_path / "wide.png").write_bytes(black_png(200_000, 1))
    qs = [{"question_id": 1, "text": "hi", "image": "ok.png"}, {"question_id": 2, "text": "hi", "image": "wide.png"}]
    model = mmkit.load(saved).eval()
    stats = answer_to_file(model, qs, tmp_path / "a.jsonl", tmp_path, max_new_tokens=2, progress=False,
                           image_limits=ImageLimits(max_aspect=1e9))
    assert stats.answered == 1 and len(stats.failed) == 1
    assert "after resize/pad (square)" in stats.failed[0].message and "--max-resized-pixels" in stats.failed[0].message


def test_training_skips_and_counts_an_image_over_the_budget(tmp_path):
    import json

    from mmkit.data.collate import Collator
    from mmkit.data.dataset import SkipCounter, build_dataset
    from mmkit.recipe import load_recipe

    (tmp_path / "big.png").write_bytes(black_png(13_000, 13_000))
    (tmp_path / "ok.png").write_bytes(black_png(40, 30))
    conv = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a square"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "big", "image": "big.png", "conversations": conv},
                                                 {"id": "ok", "image": "ok.png", "conversations": conv}]))
    model = mmkit.build(TINY)
    recipe = load_recipe(TINY, [f"data.sources=[{{path: {tmp_path / 'd.json'}}}]"])
    ds = build_dataset(recipe.data, model.processor)
    batch = Collator(model.processor)([ds[k] for k in range(len(ds))])
    skips = SkipCounter.from_dict(batch["skips"])
    assert skips.counts == {"image_too_large": 1} and batch["input_ids"].shape[0] == 1
    assert "13000x13000 = 169000000 pixels" in skips.summary()
    assert "(raise it with data.image_limits.max_pixels)" in skips.summary()
    # the recipe key raises it (a counted skip no more)
    recipe = load_recipe(TINY, [f"data.sources=[{{path: {tmp_path / 'd.json'}}}]",
                                "data.image_limits.max_pixels=200000000"])
    assert recipe.data.image_limits.max_pixels == 200_000_000


@pytest.mark.parametrize("override,message", [
    ("data.image_limits.max_pixels=0", "data.image_limits.max_pixels: expected a positive integer"),
    ("data.image_limits.max_aspect=0.5", "data.image_limits.max_aspect: expected a number >= 1"),
    ("data.image_limits.max_pixel=5", "data.image_limits.max_pixel: unknown key; did you mean 'max_pixels'?"),
])
def test_image_limit_recipe_keys_are_checked(capsys, override, message):
    code, _, err = dry_run(capsys, TINY, override)
    assert code == 2 and message in err and err.count("\n") == 1


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_hostile_images_do_not_grow_the_servers_peak_memory(tmp_path):
    """A subprocess server on a `pad` model, aspect limit lifted so that the size-after-pad check is what stops the
    thin images: the item-2 images together raise its peak RSS (VmHWM) by less than 200 MB."""
    import httpx

    model_dir = tmp_path / "pad"
    mmkit.build(TINY, overrides=["model.image.aspect_ratio=pad"]).save(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mmkit.serve", "--model", str(model_dir), "--port", str(port),
                             "--model-name", "bytes", "--max-image-aspect", "1e9", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}")
        # warm up every path once (a real image through decode, preprocessing and generation)
        assert httpx.post(base, json=_image_body(black_png(640, 480)), timeout=60).status_code == 200
        baseline = _proc_kib(proc.pid, "VmRSS")
        try:  # "5" resets the peak RSS to the current RSS (Linux: Documentation/filesystems/proc.rst, clear_refs)
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        except OSError:
            baseline = _proc_kib(proc.pid, "VmHWM")  # no reset: growth of the peak since start-up
        hostile = [black_png(4_000_000, 1), black_png(200_000, 1), black_png(20_000, 1), black_png(13_000, 13_000)]
        for data in hostile:
            r = httpx.post(base, json=_image_body(data), timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large", r.text
        peak = _proc_kib(proc.pid, "VmHWM")
        assert peak - baseline < 200 * 1024, f"peak RSS grew by {(peak - baseline) / 1024:.0f} MB"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
