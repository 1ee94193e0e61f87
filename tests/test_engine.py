"""The batching engine: every request of a mixed concurrent load gets exactly what it gets alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmkit
from mmkit.infer.chat import build_chat_inputs, chat, stop_options, stream_chat
from mmkit.infer.engine import Engine, ImageFeatureCache
from mmkit.infer.generate import generate
from tests.byte_tokenizer import byte_level_tokenizer
from tests.test_chat_cli import make_chat_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return mmkit.load(make_chat_model_dir(tmp_path_factory.mktemp("engine-model") / "tiny")).eval()


def byte_model(seed: int = 0):
    """The tiny recipe with a byte-level BPE tokenizer, random weights; special tokens never generated."""
    torch.manual_seed(seed)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml", tokenizer=byte_level_tokenizer()).eval()
    with torch.no_grad():
        for tok in ("<unk>", "<s>", "</s>", "<image>"):
            model.llm.lm_head.weight[model.tokenizer.convert_tokens_to_ids(tok)].zero_()
    return model


@pytest.fixture(scope="module")
def bmodel():
    return byte_model()


RED = Image.new("RGB", (40, 30), (255, 0, 0))
BLUE = Image.new("RGB", (30, 50), (0, 0, 255))


def _inputs(model, text, images=()):
    content = "".join("<image>\n" for _ in images) + text
    return build_chat_inputs(model, [{"role": "user", "content": content}], list(images))


def _load(model):
    """>= 8 requests: with and without images, short and long prompts, stop strings, max_tokens."""
    long = "tell me about the red square and the blue circle " * 8
    cases = [
        ("what color ?", [RED], {}),
        ("hi", [], {}),
        (long, [RED], {}),
        (long, [], {"max_new_tokens": 30}),
        ("what shape ?", [BLUE], {"stop": ["there"]}),
        ("describe", [RED, BLUE], {}),
        ("where is it ?", [], {"stop": ["human", "at"]}),
        ("what color ?", [RED], {"max_new_tokens": 1}),
        ("count", [BLUE], {"max_new_tokens": 25}),
        (long + long, [], {"max_new_tokens": 7}),
    ]
    out = []
    for i, (text, images, extra) in enumerate(cases):
        gen = {"max_new_tokens": 12 + i, "ignore_eos": True, **extra}
        out.append((_inputs(model, text, images), gen))
    return out


def _alone(model, inputs, gen):
    res = generate(model, **inputs, return_dict=True, **gen)
    return res.token_ids[0], res.finish_reasons[0]


@pytest.mark.parametrize("forward_threads,prefix_cache", [(1, True), (2, True), (1, False)])
def test_mixed_concurrent_load_is_token_identical_to_running_alone(model, forward_threads, prefix_cache):
    load = _load(model)
    assert max(int(i["input_ids"].shape[1]) for i, _ in load) > 64  # chunked prefill below
    # fewer slots than requests: some wait; 2 threads: prefill beside decode, or the decode batch split;
    # the prompts share the chat template's system prompt (and two are the same): prefixes are reused
    engine = Engine(model, max_batch_size=6, max_batch_tokens=64, forward_threads=forward_threads,
                    prefix_cache=prefix_cache)
    try:
        results = [None] * len(load)

        def client(k):
            inputs, gen = load[k]
            req = engine.submit(**inputs, **gen)
            if k % 2:  # streaming: iterate the deltas as they come
                deltas = list(req)
                results[k] = (req, "".join(deltas))
            else:
                results[k] = (req.wait(), None)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(load))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for k, (inputs, gen) in enumerate(load):
            req, streamed = results[k]
            ids, finish = _alone(model, inputs, gen)
            assert req.token_ids == ids, f"request {k}: batched {req.token_ids} alone {ids}"
            assert req.finish_reason == finish
            if streamed is not None:
                assert streamed == req.text
        assert engine.num_running == 0 and engine.queue_depth == 0
        reused = [results[k][0].cached_tokens for k in range(len(load))]
        if prefix_cache:
            assert sum(reused) > 0 and engine.prefix_hit_tokens_total == sum(reused)
        else:
            assert reused == [0] * len(load)
    finally:
        engine.close()


def test_prefix_reuse_copies_the_shared_prompt_and_recomputes_only_the_rest(model):
    same = _inputs(model, "what color is it ?", [RED])
    other = _inputs(model, "what color is it now ?", [RED])
    n = int(same["input_ids"].shape[1])
    shared = next(i for i in range(n) if int(same["input_ids"][0, i]) != int(other["input_ids"][0, i]))
    engine = Engine(model, max_batch_size=4, max_batch_tokens=512)
    try:
        first = engine.generate(**same, max_new_tokens=6, ignore_eos=True)
        assert first.cached_tokens == 0
        # submitted together: the second and third wait one step for the first's prefill, then copy it
        reqs = [engine.submit(**x, max_new_tokens=6, ignore_eos=True) for x in (other, same, same)]
        for r in reqs:
            r.wait(30)
        assert [r.cached_tokens for r in reqs] == [shared, n - 1, n - 1]  # the last prompt token always runs
        for r, x in zip(reqs, (other, same, same)):
            assert r.token_ids == _alone(model, x, {"max_new_tokens": 6, "ignore_eos": True})[0]
        assert reqs[1].token_ids == first.token_ids
    finally:
        engine.close()


def test_a_raising_callback_or_detokenizer_fails_only_its_request(model):
    """on_event raising: that request is cancelled; its detokenizer raising: it fails with that error; the
    other requests of the batch finish token-identically and the engine keeps serving."""
    engine = Engine(model, max_batch_size=4)
    gen = {"max_new_tokens": 10, "ignore_eos": True}
    texts = ["what color ?", "hi", "describe it", "count"]
    inputs = [_inputs(model, t, [RED] if k % 2 else []) for k, t in enumerate(texts)]
    try:
        def boom(kind, value):
            if kind == "delta":
                raise RuntimeError("the consumer broke")

        with engine.tokenizer_lock:  # the scheduler samples under this lock: nothing is sampled before the patch
            cb = engine.submit(**inputs[0], **gen, on_event=boom)
            bad = engine.submit(**inputs[1], **gen)
            goods = [engine.submit(**x, **gen) for x in inputs[2:]]

            def broken(tok):
                raise UnicodeError("detokenizer broke")

            bad.detok.add = broken
        with pytest.raises(UnicodeError, match="detokenizer broke"):
            bad.wait(30)
        assert cb.done.wait(30) and cb.finish_reason is None and cb.error is None
        assert cb.completion_tokens < 10  # stopped at the step after the callback raised
        for r, x in zip(goods, inputs[2:]):
            assert r.wait(30).token_ids == _alone(model, x, gen)[0]
        after = engine.generate(**inputs[0], **gen)  # still serving, the slots came back
        assert after.token_ids == _alone(model, inputs[0], gen)[0]
        assert engine.num_running == 0 and engine.queue_depth == 0
    finally:
        engine.close()


def test_sampling_with_a_seed_is_the_same_in_a_batch(model):
    inputs = _inputs(model, "what color ?", [RED])
    gen = {"max_new_tokens": 10, "temperature": 1.3, "top_p": 0.9, "seed": 7, "ignore_eos": True}
    engine = Engine(model, max_batch_size=4)
    try:
        reqs = [engine.submit(**inputs, **gen)] + [engine.submit(**_inputs(model, "hi"), max_new_tokens=15,
                                                                 temperature=1.0, seed=s) for s in range(3)]
        assert reqs[0].wait().token_ids == _alone(model, inputs, gen)[0]
        for r in reqs[1:]:
            r.wait()
    finally:
        engine.close()


def test_byte_level_stream_is_exact(bmodel):
    """Random weights over a byte-level vocabulary: multi-byte characters are cut everywhere."""
    tok = bmodel.tokenizer
    engine = Engine(bmodel, max_batch_size=8)
    try:
        reqs = []
        for k in range(8):
            text = ["héllo", "你好世界", "🙂 ok", "the quick brown fox"][k % 4]
            inputs = _inputs(bmodel, text, [RED] if k % 3 else [])
            reqs.append((engine.submit(**inputs, max_new_tokens=5 + 3 * k, ignore_eos=True, strip=True), inputs))
        for req, inputs in reqs:
            deltas = list(req)
            full = tok.decode(req.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert "".join(deltas) == req.text == full.strip()
            assert req.token_ids == _alone(bmodel, inputs, {"max_new_tokens": len(req.token_ids),
                                                             "ignore_eos": True})[0]
        assert any("\ufffd" in tok.decode([t]) for req, _ in reqs for t in req.token_ids)
    finally:
        engine.close()


def test_byte_level_stop_strings_spanning_tokens(bmodel):
    tok = bmodel.tokenizer
    inputs = _inputs(bmodel, "你好世界 🙂")
    free = generate(bmodel, **inputs, max_new_tokens=40, ignore_eos=True, return_dict=True).token_ids[0]
    text = tok.decode(free, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = next(text[a:a + 3] for a in range(5, len(text) - 3) if "\ufffd" not in text[a:a + 3])
    engine = Engine(bmodel)
    try:
        req = engine.submit(**inputs, max_new_tokens=40, ignore_eos=True, stop=[stop])
        deltas = list(req)
        assert req.finish_reason == "stop" and "".join(deltas) == req.text == text[:text.find(stop)]
        assert len(req.token_ids) < 40
    finally:
        engine.close()


def test_cancel_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, max_batch_size=1)
    try:
        long = engine.submit(**_inputs(model, "hi"), max_new_tokens=200, ignore_eos=True)
        waiting = engine.submit(**_inputs(model, "what color ?", [RED]), max_new_tokens=3, ignore_eos=True)
        for _ in zip(range(2), long):
            pass
        long.cancel()
        assert long.done.wait(20) and long.finish_reason is None and long.completion_tokens < 200
        assert waiting.wait(20).completion_tokens == 3  # got the freed slot
        assert engine.num_running == 0
    finally:
        engine.close()


def test_a_failing_request_does_not_take_others_down(model):
    engine = Engine(model, max_batch_size=4)
    try:
        bad = _inputs(model, "what color ?", [RED])
        bad["pixel_values"] = list(bad["pixel_values"]) * 2  # two images for one placeholder
        bad["image_sizes"] = list(bad["image_sizes"]) * 2 if bad.get("image_sizes") is not None else None
        good = engine.submit(**_inputs(model, "hi"), max_new_tokens=5, ignore_eos=True)
        with pytest.raises(ValueError, match="features and image tokens do not match"):
            engine.submit(**bad, max_new_tokens=5).wait(20)
        assert good.wait(20).completion_tokens == 5
    finally:
        engine.close()


def test_image_features_are_computed_once_per_image(model):
    calls = []
    vision = model.vision
    handle = vision.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    engine = Engine(model, max_batch_size=4)
    try:
        reqs = [engine.submit(**_inputs(model, f"turn {k}", [RED]), max_new_tokens=3) for k in range(4)]
        reqs.append(engine.submit(**_inputs(model, "both", [RED, BLUE]), max_new_tokens=3))
        for r in reqs:
            r.wait(30)
        assert len(calls) == 2  # RED once, BLUE once
        assert engine.image_cache.misses == 2 and engine.image_cache.hits == 4
        assert sum(r.image_cache_hits for r in reqs) == 4
        # the same image gives the same features, so the prompts share their keys/values up to the text
        assert reqs[0].cached_tokens == 0
        assert all(0 < r.cached_tokens < r.prompt_tokens for r in reqs[1:])
    finally:
        handle.remove()
        engine.close()


def test_image_cache_lru_and_byte_bound():
    f = torch.zeros(10, 4)  # 160 bytes
    cache = ImageFeatureCache(max_bytes=400)
    keys = [ImageFeatureCache.key(torch.full((1, 3, 2, 2), float(i))) for i in range(4)]
    assert len(set(keys)) == 4 and keys[0] == ImageFeatureCache.key(torch.full((1, 3, 2, 2), 0.0))
    assert cache.get(keys[0]) is None and cache.misses == 1
    cache.put(keys[0], f)
    cache.put(keys[1], f)
    assert cache.get(keys[0]) is f and cache.hits == 1  # keys[0] is now the most recent
    cache.put(keys[2], f)  # 480 > 400: the least recent (keys[1]) goes
    assert cache.bytes == 320 and len(cache) == 2
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is f and cache.get(keys[2]) is f
    cache.put(keys[3], torch.zeros(200, 4))  # bigger than the whole cache: not kept
    assert cache.get(keys[3]) is None and cache.bytes <= 400


def test_chat_and_stream_chat_through_the_engine(model):
    engine = Engine(model, max_batch_size=2)
    try:
        reply, hist = chat(model, RED, "what color ?", engine=engine, max_new_tokens=8)
        assert reply == chat(model, RED, "what color ?", max_new_tokens=8)[0]
        stream = stream_chat(model, None, "and the shape ?", hist, engine=engine, max_new_tokens=8)
        text = "".join(stream)
        assert text == stream.reply == chat(model, None, "and the shape ?", hist, max_new_tokens=8)[0]
        assert len(stream.history.messages) == 4
    finally:
        engine.close()


def test_stop_options_are_applied(model):
    assert stop_options(model)["stop"]  # the template's end-of-turn strings reach the engine through chat()


def test_bad_arguments_are_clear(model):
    engine = Engine(model, max_batch_size=1)
    try:
        with pytest.raises(ValueError, match="one prompt"):
            engine.submit(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="context length"):
            engine.submit(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10_000)
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit(torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1)
        assert engine.submit(torch.ones(1, 3, dtype=torch.long), max_new_tokens=0).wait(10).finish_reason == "length"
    finally:
        engine.close()
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=0)


@pytest.mark.parametrize("text,vision", [("llama", "clip"), ("qwen2", "siglip")])
def test_llava_hf_models_match_generate(tmp_path, text, vision):
    """transformers-written llava-hf models (GQA, Qwen2 biases): batched, chunked, with and without images."""
    from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tokens_per_image

    hf = tiny_llava_hf(text, vision)
    hf.save_pretrained(tmp_path)
    m = mmkit.load(tmp_path).eval()
    n = tokens_per_image(hf)
    rows = [[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9], list(range(20, 45)), [1] + [IMAGE_TOKEN] * n + [3]]
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(1, 3, 28, 28, generator=g), None, torch.randn(1, 3, 28, 28, generator=g)]
    engine = Engine(m, max_batch_size=4, max_batch_tokens=16)
    try:
        reqs = [engine.submit(torch.tensor([r]), pixel_values=p, max_new_tokens=12, ignore_eos=True)
                for r, p in zip(rows, pixels)]
        for r, p, req in zip(rows, pixels, reqs):
            ref = generate(m, torch.tensor([r]), pixel_values=p, max_new_tokens=12, ignore_eos=True)[0].tolist()
            assert req.wait(60).token_ids == ref
    finally:
        engine.close()


def test_sliding_window_llm_is_limited_to_its_window(model):
    cfg = model.llm.config.get_text_config()
    cfg.sliding_window = 40
    try:
        engine = Engine(model, max_batch_size=1)
        try:
            assert engine.context_length == 40
            with pytest.raises(ValueError, match="context length 40"):
                engine.submit(torch.ones(1, 30, dtype=torch.long), max_new_tokens=20)
        finally:
            engine.close()
    finally:
        del cfg.sliding_window
