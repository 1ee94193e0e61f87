"""mmkit's decoding loop: token-identical to transformers' LlavaForConditionalGeneration.generate (greedy)."""

from __future__ import annotations

import pytest
import torch

import mmkit
from mmkit.infer.generate import _held_back, generate, stream_generate
from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tokens_per_image

CASES = [("llama", "clip"), ("qwen2", "siglip")]
NEW = 12


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def pair(request, tmp_path_factory):
    text, vision = request.param
    hf = tiny_llava_hf(text, vision)
    path = tmp_path_factory.mktemp(f"gen-{text}-{vision}")
    hf.save_pretrained(path)
    ours = mmkit.load(path).eval()
    return hf, ours


def _batch(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _image_rows(n):
    return [
        [1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9, 10, 11, 12],
        [1, 5] + [IMAGE_TOKEN] * n + [7, 8],
        [1, 3, 4, 40] + [IMAGE_TOKEN] * n + [20, 21, 22, 23, 24, 25, 26, 27],
    ]


def _hf_generate(hf, ids, mask, pixels=None, **kw):
    if pixels is not None:
        kw["pixel_values"] = pixels
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          **kw)
    return out[:, ids.shape[1]:]


def test_greedy_single_prompt_with_image(pair):
    hf, ours = pair
    ids, mask = _batch(_image_rows(tokens_per_image(hf))[:1])
    pixels = torch.randn(1, 3, 28, 28)
    ref = _hf_generate(hf, ids, mask, pixels)
    got = generate(ours, ids, mask, pixel_values=pixels, max_new_tokens=NEW)
    assert ref.shape == (1, NEW)
    assert torch.equal(got, ref), f"\nours {got.tolist()}\nhf   {ref.tolist()}"


def test_greedy_single_prompt_text_only(pair):
    hf, ours = pair
    ids, mask = _batch([[1, 17, 18, 19, 20, 21]])
    ref = _hf_generate(hf, ids, mask)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)  # through the model method
    assert torch.equal(got, ref), f"\nours {got.tolist()}\nhf   {ref.tolist()}"


def test_greedy_left_padded_batch_of_three_with_images(pair):
    hf, ours = pair
    ids, mask = _batch(_image_rows(tokens_per_image(hf)))
    assert len(set(mask.sum(1).tolist())) == 3  # three different lengths
    pixels = torch.randn(3, 3, 28, 28)
    ref = _hf_generate(hf, ids, mask, pixels)
    got = generate(ours, ids, mask, pixel_values=pixels, max_new_tokens=NEW)
    assert torch.equal(got, ref), f"\nours {got.tolist()}\nhf   {ref.tolist()}"
    # each row alone gives the same tokens as inside the padded batch
    for row in range(3):
        real = mask[row].bool()
        alone = generate(ours, ids[row][real][None], pixel_values=pixels[row:row + 1], max_new_tokens=NEW)
        k = alone.shape[1]
        assert torch.equal(alone[0], got[row, :k]) and (got[row, k:] == 0).all()


def test_greedy_left_padded_text_batch(pair):
    hf, ours = pair
    ids, mask = _batch([[1, 30, 31], [1, 32, 33, 34, 35, 36, 37], [1, 38, 39, 40, 41]])
    ref = _hf_generate(hf, ids, mask)
    got = generate(ours, ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, ref), f"\nours {got.tolist()}\nhf   {ref.tolist()}"


def test_eos_stops_rows_like_transformers(pair):
    hf, ours = pair
    ids, mask = _batch(_image_rows(tokens_per_image(hf)))
    pixels = torch.randn(3, 3, 28, 28)
    free = generate(ours, ids, mask, pixel_values=pixels, max_new_tokens=NEW, ignore_eos=True)
    eos = int(free[1, 2])  # a token row 1 produces at step 3: that row must stop there
    ref = _hf_generate(hf, ids, mask, pixels, eos_token_id=eos)
    res = generate(ours, ids, mask, pixel_values=pixels, max_new_tokens=NEW, stop_token_ids=[eos], ignore_eos=True,
                   pad_token_id=0, return_dict=True)
    first = free[1].tolist().index(eos)
    assert res.token_ids[1] == free[1, : first + 1].tolist()
    assert res.finish_reasons[1] == "stop"
    width = res.sequences.shape[1]
    assert torch.equal(res.sequences, ref[:, :width]), f"\nours {res.sequences.tolist()}\nhf   {ref.tolist()}"
    assert (ref[:, width:] == 0).all()


def test_vision_tower_runs_once_per_request(pair):
    _, ours = pair
    calls = []
    handle = ours.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        rows = _image_rows(ours.vision.num_tokens)
        ids, mask = _batch(rows)
        generate(ours, ids, mask, pixel_values=torch.randn(3, 3, 28, 28), max_new_tokens=8, ignore_eos=True)
    finally:
        handle.remove()
    assert calls == [1]


def test_usage_counts(pair):
    hf, ours = pair
    n = tokens_per_image(hf)
    ids, mask = _batch(_image_rows(n))
    res = generate(ours, ids, mask, pixel_values=torch.randn(3, 3, 28, 28), max_new_tokens=5, ignore_eos=True,
                   return_dict=True)
    assert res.num_prompt_tokens == [len(r) for r in _image_rows(n)]
    assert res.num_image_tokens == [n, n, n]
    assert res.num_generated_tokens == [5, 5, 5]
    assert res.finish_reasons == ["length"] * 3


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, ours = pair
    ids, mask = _batch([[1, 30, 31, 32], [1, 33, 34, 35]])
    greedy = generate(ours, ids, mask, max_new_tokens=10, ignore_eos=True)
    kw = dict(max_new_tokens=10, ignore_eos=True, temperature=5.0)
    a = generate(ours, ids, mask, seed=1, **kw)
    b = generate(ours, ids, mask, seed=1, **kw)
    assert torch.equal(a, b)
    others = [generate(ours, ids, mask, seed=s, **kw) for s in (2, 3, 4)]
    assert any(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, greedy)  # temperature 5 over a random model: not the argmax path
    assert torch.equal(generate(ours, ids, mask, seed=5, top_k=1, **kw), greedy)
    assert torch.equal(generate(ours, ids, mask, seed=5, top_p=1e-6, **kw), greedy)
    assert torch.equal(generate(ours, ids, mask, temperature=0.0, max_new_tokens=10, ignore_eos=True), greedy)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(generate(ours, ids, mask, generator=g, **kw), a)


def test_top_k_restricts_the_support(pair):
    _, ours = pair
    ids, mask = _batch([[1, 30, 31, 32]])
    with torch.no_grad():
        logits = ours(input_ids=ids).logits[0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    firsts = {int(generate(ours, ids, mask, max_new_tokens=1, temperature=50.0, top_k=3, seed=s)[0, 0])
              for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


def test_bad_options_are_clear_errors(pair):
    _, ours = pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="temperature"):
        generate(ours, ids, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, ids, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, ids, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="tokenizer"):
        generate(ours, ids, return_text=True)
    assert generate(ours, ids, max_new_tokens=0).shape == (1, 0)


# --------------------------------------------------------------------------- text: stop strings and streaming


@pytest.fixture(scope="module")
def worded(pair):
    """The tiny model with a word tokenizer covering all of its 128 ids."""
    from mmkit.data.tokenizer import build_word_tokenizer

    _, ours = pair
    tok = build_word_tokenizer([" ".join(f"w{i}" for i in range(140))])
    assert len(tok) >= ours.llm.get_input_embeddings().weight.shape[0]
    old = ours.tokenizer
    ours.tokenizer = tok
    yield ours
    ours.tokenizer = old


def test_text_and_stream_agree(worded):
    ids = torch.tensor([[1, 30, 31, 32, 33]])
    text = generate(worded, ids, max_new_tokens=10, ignore_eos=True, return_text=True)[0]
    stream = stream_generate(worded, ids, max_new_tokens=10, ignore_eos=True)
    deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == text == stream.text
    assert stream.finish_reason == "length" and stream.completion_tokens == 10 and stream.prompt_tokens == 5


def test_stop_string_truncates_generate_and_stream(worded):
    ids = torch.tensor([[1, 30, 31, 32, 33]])
    res = generate(worded, ids, max_new_tokens=10, ignore_eos=True, return_dict=True)
    words = res.texts[0].split(" ")
    assert len(words) >= 4
    stop = " " + words[3]  # multi-word-boundary stop string
    cut = res.texts[0].index(stop)
    got = generate(worded, ids, max_new_tokens=10, ignore_eos=True, stop=[stop], return_dict=True)
    assert got.texts[0] == res.texts[0][:cut]
    assert got.finish_reasons == ["stop"]
    assert got.token_ids[0] == res.token_ids[0][: len(got.token_ids[0])]
    assert len(got.token_ids[0]) < 10
    stream = stream_generate(worded, ids, max_new_tokens=10, ignore_eos=True, stop=stop)
    deltas = list(stream)
    assert "".join(deltas) == got.texts[0]
    assert stream.finish_reason == "stop"
    assert all(stop not in d for d in deltas)


def test_stream_never_splits_a_multibyte_character(pair):
    """A byte-level tokenizer may need several tokens for one character: no U+FFFD ever reaches the client."""
    _, ours = pair
    target = "日本語 ok é 😀!".encode()

    class ByteTokenizer:  # the k-th generated token is the k-th byte of ``target``
        eos_token_id = None
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True, **kwargs):
            return target[: len(ids)].decode("utf-8", errors="replace")

    stream = stream_generate(ours, torch.tensor([[1, 5, 6]]), max_new_tokens=len(target), ignore_eos=True,
                             tokenizer=ByteTokenizer())
    deltas = list(stream)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == target.decode()
    assert len(deltas) >= 5


def test_held_back():
    assert _held_back("hello </", ["</s>"]) == 2
    assert _held_back("hello", ["</s>"]) == 0
    assert _held_back("ab\ufffd", []) == 1
    assert _held_back("ab USER", ["\nUSER:", "USER:"]) == 4


# --------------------------------------------------------------------------- quantization (mmkit.quant)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_llm_generates(tmp_path, mode):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mmkit[quant]')")
    import bitsandbytes as bnb

    from mmkit.quant import quantize_llm

    hf = tiny_llava_hf("llama", "clip")
    hf.save_pretrained(tmp_path)
    model = mmkit.load(tmp_path).eval()
    n = tokens_per_image(hf)
    ids, mask = _batch(_image_rows(n)[:2])
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    report = quantize_llm(model, mode)
    cls = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    quantized = [m for m in model.llm.modules() if isinstance(m, cls)]
    assert report.layers == len(quantized) == 2 * 7  # q k v o gate up down per layer
    assert type(model.llm.lm_head) is torch.nn.Linear  # the head stays
    assert not any(isinstance(m, cls) for m in model.vision.modules())
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())
    assert report.llm_bytes_after < report.llm_bytes_before
    if mode == "4bit":
        assert quantized[0].compute_dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert rel < (0.6 if mode == "4bit" else 0.05), rel  # tiny dims: nf4 blocks of 64 are coarse
    out = generate(model, ids, mask, pixel_values=pixels, max_new_tokens=6, ignore_eos=True)
    assert out.shape == (2, 6)
    assert "MiB" in str(report)


def test_quantize_without_bitsandbytes_names_the_extra(pair, monkeypatch):
    import sys

    from mmkit.quant import QuantizationUnavailableError, quantize_llm

    _, ours = pair
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.nn", None)
    with pytest.raises(QuantizationUnavailableError, match=r"pip install 'mmkit\[quant\]'"):
        quantize_llm(ours, "4bit")
    assert type(ours.llm.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # untouched


def test_quantize_bad_arguments(pair):
    from mmkit.quant import quantize_llm

    _, ours = pair
    with pytest.raises(ValueError, match="choices"):
        quantize_llm(ours, "3bit")
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_llm(ours, "4bit", compute_dtype=torch.float16)
