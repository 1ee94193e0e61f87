"""data.packing: a packed micro-batch gives the logits, loss and gradients of the padded batch (fp32, <= 1e-5)
for Llama and Qwen2 backbones, flat CLIP/SigLIP and LLaVA-NeXT AnyRes images of several sizes and text-only
samples; training with packing gives the losses of the unpacked run (accumulation, 2 DDP processes in
tests/test_distributed.py) and resumes bit-identically after a kill; pad_share is reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmkit
from mmkit.data.collate import MODEL_KEYS, Collator
from mmkit.data.packing import (
    IGNORE_INDEX,
    block_causal_mask,
    first_fit_decreasing,
    mask_form_for,
    pack_rows,
    pack_samples,
)
from mmkit.processing.processor import MultimodalProcessor
from mmkit.recipe import RecipeError, load_recipe
from mmkit.train.__main__ import main as train_main
from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tiny_llava_next_hf
from tests.test_train import run_train, weights

TOL = 1e-5


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- units


def test_first_fit_decreasing_by_hand():
    # longest first: 8 -> row 0; 5 -> row 1; 4 -> row 1 (9); 3 -> row 2; 2 -> row 0 (10)
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert first_fit_decreasing([4, 4, 4], 8) == [[0, 1], [2]]  # ties: the earlier sample first
    with pytest.raises(ValueError, match="11 tokens does not fit in a packed row of 10"):
        first_fit_decreasing([3, 11], 10)


def test_pack_rows_pads_no_more_than_the_padded_batch():
    # FFD at 256 makes 100+60+60 | 60+60 (width 220); the same 2 rows fit width 180
    assert pack_rows([100, 60, 60, 60, 60], 256) == [[0, 1], [2, 3, 4]]
    # 2 rows of 210 | 70 would be 420 positions: one sample per row (280, as padded) wins
    assert pack_rows([70] * 4, 256) == [[0], [1], [2], [3]]
    assert pack_rows([60] * 4, 256) == [[0], [1], [2], [3]]  # as many positions as one row: the narrower wins
    assert pack_rows([30, 60, 50, 40], 256) == [[1, 2, 3, 0]]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        lengths = torch.randint(1, 100, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        cap = int(torch.randint(max(lengths), 300, (1,), generator=g))
        rows = pack_rows(lengths, cap)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        assert width <= cap and len(rows) * width <= len(lengths) * max(lengths)
        assert len(rows) <= len(first_fit_decreasing(lengths, max(lengths)))


def _sample(ids, labels, n_images=0, sid=None):
    pix = [torch.full((1, 3, 2, 2), float(len(ids) * 10 + k)) for k in range(n_images)]
    return {"input_ids": ids, "labels": labels, "pixel_values": pix,
            "image_sizes": [(len(ids), k) for k in range(n_images)], "id": sid}


def test_pack_samples_positions_labels_mask_and_image_order():
    a = _sample([1, 5, 6], [-100, 5, 6], n_images=1)
    b = _sample([1, 7, 8, 9, 4], [-100, 7, 8, 9, 4], n_images=2)
    c = _sample([1, 3, 3, 3], [3, 3, 3, 3])  # a supervised first token: masked when packed
    out = pack_samples([a, b, c], pack_length=8, pad_id=0)
    # 5 | 4+3 at width 7 (FFD at 8 has the same 2 rows, 1 position wider)
    assert out["pack_layout"] == [[(1, 0, 5)], [(2, 0, 4), (0, 4, 3)]]
    assert out["input_ids"].tolist() == [[1, 7, 8, 9, 4, 0, 0], [1, 3, 3, 3, 1, 5, 6]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 7, 8, 9, 4, -100, -100], [-100, 3, 3, 3, -100, 5, 6]]
    # images in packed order: b's two, then a's
    assert [tuple(s) for s in out["image_sizes"]] == [(5, 0), (5, 1), (3, 0)]
    assert [float(p.flatten()[0]) for p in out["pixel_values"]] == [50.0, 51.0, 30.0]
    mask = out["attention_mask"]
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    seg = torch.tensor([[1, 1, 1, 1, 1, -1, -1], [2, 2, 2, 2, 0, 0, 0]])
    expected = (seg[:, :, None] == seg[:, None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0], expected)
    assert not mask[1, 0, 4, :4].any() and mask[1, 0, 6, 4:7].all()  # a's tokens never see c's
    additive = block_causal_mask(seg, "additive")
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, expected[:, None])
    assert (additive[~expected[:, None]] == torch.finfo(torch.float32).min).all()


def test_collator_packs_counts_tokens_and_slots():
    class Proc(MultimodalProcessor):  # pad() and pad_token_id (0 without a tokenizer) are all Collator needs
        def __init__(self):
            self.tokenizer = None

    samples = [_sample([1, 5, 6], [-100, 5, 6], sid="a"), _sample([1, 7, 8, 9, 4], [-100, 7, 8, 9, 4], sid="b"),
               _sample([1, 3], [-100, 3], sid="c")]
    padded = Collator(Proc())(samples)
    assert (padded["num_tokens"], padded["num_slots"]) == (10, 15) and "position_ids" not in padded
    packed = Collator(Proc(), pack_length=8)(samples)
    assert (packed["num_tokens"], packed["num_slots"]) == (10, 10)  # 5 | 3+2
    assert packed["ids"] == ["a", "b", "c"] and packed["pack_layout"] == [[(1, 0, 5)], [(0, 0, 3), (2, 3, 2)]]
    assert "position_ids" in MODEL_KEYS
    with pytest.raises(ValueError, match=r"sample 'b' has 5 tokens, more than data.pack_length=4"):
        Collator(Proc(), pack_length=4)(samples)


def test_mask_form_per_attention_implementation():
    assert mask_form_for("sdpa") == "bool" and mask_form_for("eager") == "additive"
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported with packing"):
        mask_form_for("flash_attention_2")


def test_recipe_packing_keys():
    r = load_recipe("recipes/tiny.yaml")
    assert (r.data.packing, r.data.pack_length) == (False, None)
    r = load_recipe("recipes/tiny.yaml", ["data.packing=true", "data.pack_length=512",
                                          "stages[1].data.packing=true"])
    assert (r.data.packing, r.data.pack_length, r.stages[1].data.packing) == (True, 512, True)
    too_short = "stages[1].data.pack_length: 100 is less than model.max_length 256"
    with pytest.raises(RecipeError, match=re.escape(too_short)):
        load_recipe("recipes/tiny.yaml", ["stages[1].data.pack_length=100"])
    with pytest.raises(RecipeError, match=re.escape("data.pack_length: expected a positive integer")):
        load_recipe("recipes/tiny.yaml", ["data.pack_length=0"])


# --------------------------------------------------------------------------------------------- model: exactness


MODELS = {
    "llama-clip": lambda: tiny_llava_hf("llama", "clip"),
    "qwen2-siglip": lambda: tiny_llava_hf("qwen2", "siglip"),
    "next-llama-clip": lambda: tiny_llava_next_hf("llama", "clip"),
    "next-qwen2-siglip": lambda: tiny_llava_next_hf("qwen2", "siglip"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    MODELS[request.param]().save_pretrained(path)
    return mmkit.load(path).train()  # dropout is 0 in these configs: train mode is deterministic


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 90, (n,), generator=g).tolist()


def make_samples(model) -> list[dict]:
    """Image samples of several sizes (one with two images), text-only samples; prompts unsupervised."""
    g = torch.Generator().manual_seed(0)
    specs = [((640, 480),), (), ((60, 300), (33, 29)), ((56, 56),), (), ((300, 60),)]
    samples = []
    for k, sizes in enumerate(specs):
        pix = model.processor.process_images([photo(w, h, k) for w, h in sizes])
        prompt = [1] + _text(g, 3 + k)
        for n in pix["num_tokens"]:
            prompt += [IMAGE_TOKEN] * n + _text(g, 2)
        answer = _text(g, 4 + 2 * k)
        # the first token is labelled: a padded batch never trains on it (the shift drops it), so neither may a
        # packed one (it would be predicted from the previous sample's last token)
        labels = prompt[:1] + [IGNORE_INDEX] * (len(prompt) - 1) + answer
        samples.append({"input_ids": prompt + answer, "labels": labels,
                        "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"], "id": f"s{k}"})
    return samples


def forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, loss_reduction="sum")
    (out.loss / out.num_supervised).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_padded_batch(model, attn):
    model.llm.set_attn_implementation(attn)
    samples = make_samples(model)
    lengths = [len(s["input_ids"]) for s in samples]
    pack_length = max(max(lengths), sum(lengths) // 2 + 4)
    padded = Collator(model.processor)(samples)
    packed = Collator(model.processor, pack_length=pack_length, mask_form=mask_form_for(attn))(samples)
    layout = packed["pack_layout"]
    order = [k for row in layout for k, _, _ in row]
    # the case is not trivial: several rows, a row with several samples, images reordered
    assert len(layout) >= 2 and max(len(row) for row in layout) >= 2 and order != sorted(order)
    assert sorted(order) == list(range(len(samples)))

    ref, ref_grads = forward_backward(model, padded)
    got, got_grads = forward_backward(model, packed)
    assert got.num_supervised == ref.num_supervised == sum(int((torch.tensor(s["labels"][1:]) != -100).sum())
                                                            for s in samples)
    assert abs(got.loss.item() - ref.loss.item()) / ref.num_supervised <= TOL
    for row, placed in enumerate(layout):
        for k, start, n in placed:
            diff = (got.logits[row, start:start + n] - ref.logits[k, :n]).abs().max().item()
            assert diff <= TOL, f"sample {k}: logits differ by {diff}"
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 10
    worst = max((got_grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert worst <= TOL, worst


# --------------------------------------------------------------------------------------------- training runs

# global batch 8 = 2 per device x 4 accumulation steps, in both stages (stage 1 has its own data: config)
ACCUM = ["stages[0].per_device_batch_size=2", "stages[1].per_device_batch_size=2"]
PACK = ["data.packing=true", "stages[1].data.packing=true"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unpacked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unpacked")
    return out, run_train(out, *ACCUM, "train.log_every=2")


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    return out, run_train(out, *ACCUM, *PACK, "train.log_every=2")


def test_packed_training_losses_equal_unpacked(unpacked_run, packed_run):
    (a, _), (b, proc) = unpacked_run, packed_run
    rows_a, rows_b = metrics(a), metrics(b)
    assert [(r["stage"], r["step"]) for r in rows_a] == [(r["stage"], r["step"]) for r in rows_b]
    assert len(rows_a) == 7
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(rows_a, rows_b)]
    assert max(diffs) <= TOL, diffs
    assert "stage 0: packing each micro-batch into rows of at most 256 tokens (4D bool" in proc.stdout


def test_pad_share_reported_with_and_without_packing(unpacked_run, packed_run):
    (a, proc_a), (b, proc_b) = unpacked_run, packed_run
    share_a, share_b = [r["pad_share"] for r in metrics(a)], [r["pad_share"] for r in metrics(b)]
    assert all(0 <= x < 1 for x in share_a + share_b)
    assert sum(share_a) > 0  # samples of different lengths: padding
    assert all(y <= x for x, y in zip(share_a, share_b)), (share_a, share_b)
    for proc in (proc_a, proc_b):
        line = proc.stdout.split("stage 1 instruct step 4/4:")[1].splitlines()[0]
        assert re.search(r", pad \d+\.\d%$", line), line


def test_packed_resume_after_kill_is_bit_identical(packed_run, tmp_path):
    ref, _ = packed_run
    out = tmp_path / "killed"
    proc = run_train(out, *ACCUM, *PACK, "train.log_every=2", faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137, proc.stderr[-2000:]
    run_train(out, *ACCUM, *PACK, "train.log_every=2", "--resume")
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed packed run differs from the uninterrupted one"
    assert [r["loss"] for r in metrics(out)][-2:] == [r["loss"] for r in metrics(ref)][-2:]


def test_dry_run_shows_packing(capsys):
    assert train_main(["recipes/tiny.yaml", "--dry-run", "stages[1].data.packing=true",
                       "stages[1].data.pack_length=512"]) == 0
    out = capsys.readouterr().out.split("stage 1 'instruct'")
    assert "packing" not in out[0] and "packing   each micro-batch into rows of at most 512 tokens" in out[1]
