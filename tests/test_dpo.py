"""DPO: mmkit's loss, rewards and gradients against TRL's ``DPOTrainer._compute_loss`` (the oracle, fp32, 1e-5),
the per-sequence log-probs against TRL's ``selective_log_softmax`` with its completion masking, preference
records (mmkit / RLAIF-V / LLaVA-RLHF field names) and their collated [chosen; rejected] batch."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import mmkit
from mmkit.train.dpo import dpo_loss, model_sequence_logps, sequence_logps
from tests.helpers import IMAGE_TOKEN, tiny_llava_hf, tokens_per_image

TOL = 1e-5



@pytest.fixture(scope="module")
def oracle():
    """TRL (the oracle; ci/test.sh installs it): ``(DPOTrainer, selective_log_softmax)``."""
    pytest.importorskip("trl", reason="trl (the DPO oracle) is not installed")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    return DPOTrainer, selective_log_softmax


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_llava_hf("llama", "clip", seed=3)
    path = tmp_path_factory.mktemp("dpo-model")
    hf.save_pretrained(path)
    return mmkit.load(path).float().train(), tokens_per_image(hf)


def pair_batch(n_img: int):
    """2 pairs, rows [chosen0, chosen1, rejected0, rejected1]: a prompt with an image, answers of unequal
    lengths, right padding."""
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 5, 6] + [IMAGE_TOKEN] * n_img + [7, 8], [1, 9] + [IMAGE_TOKEN] * n_img + [10, 11, 12]]
    answers = [[20, 21, 22, 2], [30, 31, 2], [40, 2], [50, 51, 52, 53, 2]]  # chosen0, chosen1, rejected0, rejected1
    rows = [prompts[k % 2] + answers[k] for k in range(4)]
    width = max(map(len, rows))
    ids = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    mask = torch.zeros(4, width, dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, :len(r)] = torch.tensor(r)
        mask[k, :len(r)] = 1
        p = len(prompts[k % 2])
        labels[k, p:len(r)] = torch.tensor(answers[k])
    pix = torch.randn(2, 3, 28, 28, generator=g)
    pixel_values = [pix[k % 2].unsqueeze(0) for k in range(4)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}


def trl_loss(oracle, model, batch, ref_c, ref_r, beta, loss_type):
    """TRL's own DPOTrainer._compute_loss on ``batch`` (precomputed reference log-probs), with a stand-in for
    its fused LM head that scores the completion tokens from the model's full logits with TRL's
    selective_log_softmax, masked as DPOTrainer masks them."""
    DPOTrainer, selective_log_softmax = oracle
    completion_mask = (batch["labels"] != -100).long()

    def fused(input_ids, attention_mask, pixel_values, labels, fused_lm_head, use_cache):
        assert fused_lm_head
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        shift = labels[:, 1:]
        keep = shift != -100
        logps = selective_log_softmax(logits[:, :-1].float(), shift.clamp(min=0)) * keep
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=keep & False)

    fused.training = True
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                          unwrap_model=lambda m: m)
    fake = SimpleNamespace(model=fused, accelerator=acc, aux_loss_enabled=False, precompute_ref_logps=True,
                           ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
                           beta=beta, label_smoothing=0.0, use_weighting=False,
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"], "completion_mask": completion_mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(fake, fused, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), params


def test_sequence_logps_match_trl_masking(tiny, oracle):
    selective_log_softmax = oracle[1]
    model, n_img = tiny
    batch = pair_batch(n_img)
    ours, counts = model_sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    shift = batch["labels"][:, 1:]
    theirs = (selective_log_softmax(logits[:, :-1].float(), shift.clamp(min=0)) * (shift != -100)).sum(1)
    assert torch.allclose(ours, theirs, atol=TOL, rtol=0), (ours, theirs)
    full, full_counts = sequence_logps(logits, batch["labels"])
    assert torch.allclose(full, theirs, atol=TOL, rtol=0)
    assert counts.tolist() == full_counts.tolist() == [4, 3, 2, 5]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_match_trl(tiny, oracle, loss_type):
    model, n_img = tiny
    batch = pair_batch(n_img)
    beta = 0.1 if loss_type == "sigmoid" else 0.5
    with torch.no_grad():
        base, _ = model_sequence_logps(model, batch)
    # a reference away from the policy, so the loss is not at its symmetric point
    ref = base + torch.tensor([0.7, -1.3, -0.4, 2.1])
    ref_c, ref_r = ref.chunk(2)

    logps, counts = model_sequence_logps(model, batch)
    pc, pr = logps.chunk(2)
    nc, nr = counts.chunk(2)
    out = dpo_loss(pc, pr, ref_c, ref_r, beta, loss_type, chosen_tokens=nc, rejected_tokens=nr)
    ours = out.losses.mean()
    g_ours, params = grads(model, ours)

    theirs, metrics = trl_loss(oracle, model, batch, ref_c, ref_r, beta, loss_type)
    g_theirs, _ = grads(model, theirs)

    assert abs(float(ours.detach()) - float(theirs.detach())) <= TOL, (float(ours.detach()), float(theirs.detach()))
    checked = 0
    for p, a, b in zip(params, g_ours, g_theirs):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, atol=TOL, rtol=1e-4), f"gradient differs ({tuple(p.shape)})"
        checked += float(a.abs().sum()) > 0
    assert checked > 5  # gradients reached the LLM and the connector
    assert abs(float(out.margins.mean()) - metrics["rewards/margins"][0]) <= TOL
    assert abs(float(out.accuracies.mean()) - metrics["rewards/accuracies"][0]) <= TOL
    assert abs(float(out.chosen_rewards.mean()) - metrics["rewards/chosen"][0]) <= TOL

    # the comparison can fail: a different beta gives a different loss
    wrong = dpo_loss(pc.detach(), pr.detach(), ref_c, ref_r, beta * 1.5, loss_type, chosen_tokens=nc,
                     rejected_tokens=nr).losses.mean()
    assert abs(float(wrong) - float(theirs)) > 1e-3


def test_label_smoothing_is_the_conservative_form():
    pc, pr = torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0])
    rc, rr = torch.tensor([-3.5, -2.5]), torch.tensor([-3.0, -1.5])
    z = 0.2 * ((pc - rc) - (pr - rr))
    want = -0.9 * torch.nn.functional.logsigmoid(z) - 0.1 * torch.nn.functional.logsigmoid(-z)
    got = dpo_loss(pc, pr, rc, rr, 0.2, "sigmoid", label_smoothing=0.1).losses
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.2, "hinge")


# --------------------------------------------------------------------------------------------- preference data


def _pair_samples(n_img: int):
    """3 preference samples of unequal prompt and answer lengths, each pair its own images (the second pair two)."""
    g = torch.Generator().manual_seed(1)
    prompts = [[1, 5, 6] + [IMAGE_TOKEN] * n_img + [7, 8],
               [1, 9] + [IMAGE_TOKEN] * n_img + [10] + [IMAGE_TOKEN] * n_img + [11, 12],
               [1] + [IMAGE_TOKEN] * n_img + [13, 14, 15, 16, 17]]
    answers = [([20, 21, 22, 2], [23, 2]), ([30, 31, 2], [32, 33, 34, 35, 36, 2]), ([40, 41, 2], [42, 43, 2])]
    out = []
    for k, (prompt, (good, bad)) in enumerate(zip(prompts, answers)):
        n = prompt.count(IMAGE_TOKEN) // n_img
        out.append({"id": str(k), "input_ids": prompt + good, "labels": [-100] * len(prompt) + good,
                    "rejected_input_ids": prompt + bad, "rejected_labels": [-100] * len(prompt) + bad,
                    "pixel_values": [torch.randn(1, 3, 28, 28, generator=g) for _ in range(n)],
                    "image_sizes": [(28, 28)] * n})
    return out


def same_grads(ga, gb) -> int:
    """Asserts two gradient lists agree (fp32, 1e-5); returns how many of them are nonzero."""
    checked = 0
    for x, y in zip(ga, gb, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, atol=TOL, rtol=1e-4)
            checked += float(x.abs().sum()) > 0
    return checked


def test_packed_pair_batch_equals_the_padded_one(tiny):
    from mmkit.data.collate import MODEL_KEYS, Collator
    from mmkit.data.packing import mask_form_for
    from mmkit.train.dpo import sequence_counts

    model, n_img = tiny
    samples = _pair_samples(n_img)
    proc = model.processor
    padded = Collator(proc, pairs=True)(samples)
    form = mask_form_for(model.llm.config._attn_implementation)
    width = max(len(s["rejected_input_ids"]) for s in samples) + len(samples[0]["input_ids"])
    packed = Collator(proc, pairs=True, pack_length=width, mask_form=form)(samples)
    assert padded["input_ids"].shape[0] == 6 and 1 < packed["input_ids"].shape[0] < 6  # really packed
    assert packed["attention_mask"].dim() == 4 and packed["num_pairs"] == 3
    assert sorted(k for row in packed["pack_layout"] for k, _, _ in row) == list(range(6))
    assert len(packed["pixel_values"]) == len(padded["pixel_values"]) == 8
    pad_b = {k: padded[k] for k in MODEL_KEYS if k in padded}
    pack_b = {k: packed[k] for k in (*MODEL_KEYS, "pack_layout") if k in packed}
    assert sequence_counts(pack_b).tolist() == sequence_counts(pad_b).tolist() == [4, 3, 3, 2, 6, 3]

    with torch.no_grad():
        base, _ = model_sequence_logps(model, pad_b)
    ref_c, ref_r = (base + torch.tensor([0.7, -1.3, 0.2, -0.4, 2.1, -0.9])).chunk(2)
    results = {}
    for name, b in (("padded", pad_b), ("packed", pack_b)):
        for loss_type, beta in (("sigmoid", 0.1), ("ipo", 0.5)):
            logps, counts = model_sequence_logps(model, b)
            (pc, pr), (nc, nr) = logps.chunk(2), counts.chunk(2)
            out = dpo_loss(pc, pr, ref_c, ref_r, beta, loss_type, chosen_tokens=nc, rejected_tokens=nr)
            loss = out.losses.mean() + 0.3 * (-pc.sum()) / nc.sum()  # with an sft_weight term
            g, _ = grads(model, loss)
            results[name, loss_type] = (logps.detach(), loss.detach(), g, out)
    for loss_type in ("sigmoid", "ipo"):
        (la, a, ga, oa), (lb, b, gb, ob) = results["padded", loss_type], results["packed", loss_type]
        assert torch.allclose(la, lb, atol=TOL, rtol=0), (la, lb)
        assert abs(float(a) - float(b)) <= TOL, (float(a), float(b))
        assert same_grads(ga, gb) > 5
        for key in ("chosen_rewards", "rejected_rewards", "margins", "accuracies"):
            assert torch.allclose(getattr(oa, key), getattr(ob, key), atol=TOL, rtol=0), key
    # the comparison can fail: with a plain causal mask, sequences packed after another attend to it
    T = pack_b["input_ids"].shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(pack_b["input_ids"].shape[0], 1, T, T)
    if form == "additive":
        causal = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    with torch.no_grad():
        leaky, _ = model_sequence_logps(model, dict(pack_b, attention_mask=causal))
    assert (leaky - results["padded", "sigmoid"][0]).abs().max() > 1e-3


@pytest.fixture(scope="module", params=["next-llama-clip", "next-qwen2-siglip"])
def next_model(request, tmp_path_factory):
    from tests.helpers import tiny_llava_next_hf

    text, vision = request.param.split("-")[1:]
    path = tmp_path_factory.mktemp(request.param)
    tiny_llava_next_hf(text, vision, seed=5).save_pretrained(path)
    return mmkit.load(path).float().train()


def _anyres_pair_samples(model):
    """Preference pairs whose images have several sizes (so several AnyRes tile grids and token counts), one
    pair with two images and one text-only pair; chosen and rejected answers of unequal lengths."""
    from tests.test_packing import _text, photo

    g = torch.Generator().manual_seed(2)
    specs = [((640, 480),), (), ((60, 300), (33, 29)), ((300, 60),)]
    out = []
    for k, sizes in enumerate(specs):
        pix = model.processor.process_images([photo(w, h, k) for w, h in sizes]) if sizes else None
        prompt = [1] + _text(g, 2 + k)
        for n in (pix["num_tokens"] if pix else []):
            prompt += [IMAGE_TOKEN] * n + _text(g, 2)
        good, bad = _text(g, 3 + k) + [2], _text(g, 6 - k) + [2]
        sample = {"id": str(k), "input_ids": prompt + good, "labels": [-100] * len(prompt) + good,
                  "rejected_input_ids": prompt + bad, "rejected_labels": [-100] * len(prompt) + bad}
        if pix:
            sample.update(pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"])
        out.append(sample)
    return out


def test_packed_pairs_with_anyres_images_of_several_sizes(next_model):
    """The packed pair batch of a LLaVA-NeXT model = the padded one (fp32, 1e-5): per-sequence log-probs, the
    DPO loss and every gradient, with images of several sizes (different tile grids), two images in one pair and
    a text-only pair, the images reordered by the packing."""
    from mmkit.data.collate import MODEL_KEYS, Collator
    from mmkit.data.packing import mask_form_for

    model = next_model
    samples = _anyres_pair_samples(model)
    counts = [s["input_ids"].count(IMAGE_TOKEN) for s in samples]
    assert len({c for c in counts if c}) >= 3  # the images really give different token counts
    proc = model.processor
    padded = Collator(proc, pairs=True)(samples)
    lengths = [len(s[k]) for s in samples for k in ("input_ids", "rejected_input_ids")]
    width = max(max(lengths), sum(lengths) // 3 + 4)
    packed = Collator(proc, pairs=True, pack_length=width,
                      mask_form=mask_form_for(model.llm.config._attn_implementation))(samples)
    order = [k for row in packed["pack_layout"] for k, _, _ in row]
    assert 1 < packed["input_ids"].shape[0] < 8 and sorted(order) == list(range(8)) and order != sorted(order)
    pad_b = {k: padded[k] for k in MODEL_KEYS if k in padded}
    pack_b = {k: packed[k] for k in (*MODEL_KEYS, "pack_layout") if k in packed}
    with torch.no_grad():
        base, _ = model_sequence_logps(model, pad_b)
    ref_c, ref_r = (base + torch.linspace(-1.0, 1.0, 8)).chunk(2)
    results = {}
    for name, b in (("padded", pad_b), ("packed", pack_b)):
        logps, n = model_sequence_logps(model, b)
        (pc, pr), (nc, nr) = logps.chunk(2), n.chunk(2)
        out = dpo_loss(pc, pr, ref_c, ref_r, 0.1, "sigmoid", chosen_tokens=nc, rejected_tokens=nr)
        loss = out.losses.mean()
        results[name] = logps.detach(), n, loss.detach(), grads(model, loss)[0]
    (la, na, a, ga), (lb, nb, b, gb) = results["padded"], results["packed"]
    assert na.tolist() == nb.tolist()
    assert torch.allclose(la, lb, atol=TOL, rtol=0), (la, lb)
    assert abs(float(a) - float(b)) <= TOL
    assert same_grads(ga, gb) > 10


def _pref_files(root):
    from PIL import Image

    (root / "img").mkdir()
    for k, color in enumerate(["red", "blue"]):
        Image.new("RGB", (32, 32), color).save(root / "img" / f"{k}.png")
    records = [
        {"id": "mm", "image": "img/0.png", "chosen": "no", "rejected": "yes",
         "conversations": [{"from": "human", "value": "<image>\nwhat color is the circle ?"},
                           {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "is there a blue square ?"}]},
        {"id": "rlaifv", "image": "img/1.png", "question": "is there a blue square ?", "chosen": "yes",
         "rejected": "no"},
        {"id": "rlhf", "image": "img/1.png", "preference": 2,
         "conversations": [{"from": "human", "value": "<image>\nwhat color is the square ?"}],
         "output_1": {"from": "llava", "value": "red"}, "output_2": {"from": "llava", "value": "blue"}},
        {"id": "bad-pref", "image": "img/1.png", "preference": 3, "conversations": [
            {"from": "human", "value": "<image>\nhi"}], "output_1": "a", "output_2": "b"},
        {"id": "plain", "image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                               {"from": "gpt", "value": "red"}]},
    ]
    path = root / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preference_records_layouts_and_pair_batch(tmp_path):
    from mmkit.data.collate import Collator
    from mmkit.data.records import IGNORE_INDEX, LlavaDataset
    from mmkit.demo.tokenizer import shapes_tokenizer
    from mmkit.processing.image import ImageProcessor
    from mmkit.processing.processor import MultimodalProcessor

    tok = shapes_tokenizer()
    proc = MultimodalProcessor(tok, ImageProcessor.clip(32, aspect_ratio="square"), "vicuna_v1", "<image>",
                               tok.convert_tokens_to_ids("<image>"), 16, 4, max_length=256)
    ds = LlavaDataset(_pref_files(tmp_path), None, proc)
    assert ds.preference and len(ds) == 3
    assert ds.skips.counts == {"structure": 2}  # preference 3; a plain record in a preference file
    samples = [ds[i] for i in range(3)]
    answers = [("no", "yes"), ("yes", "no"), ("blue", "red")]
    for s, (good, bad) in zip(samples, answers):
        sup = [t for t in s["labels"] if t != IGNORE_INDEX]
        rej = [t for t in s["rejected_labels"] if t != IGNORE_INDEX]
        assert tok.decode(sup, skip_special_tokens=True).strip() == good  # the final answer only
        assert tok.decode(rej, skip_special_tokens=True).strip() == bad
        # same prompt: the ids agree up to the first supervised token
        start = next(k for k, t in enumerate(s["labels"]) if t != IGNORE_INDEX)
        assert s["input_ids"][:start] == s["rejected_input_ids"][:start]
    batch = Collator(proc, pairs=True)(samples)
    assert batch["num_pairs"] == 3 and batch["input_ids"].shape[0] == 6
    assert len(batch["pixel_values"]) == 6
    for k, s in enumerate(samples):
        n, m = len(s["input_ids"]), len(s["rejected_input_ids"])
        assert batch["input_ids"][k, :n].tolist() == s["input_ids"]
        assert batch["input_ids"][3 + k, :m].tolist() == s["rejected_input_ids"]
        assert batch["labels"][3 + k, :m].tolist() == s["rejected_labels"]
    # an sft stage reading the same file trains on the chosen conversation
    plain = Collator(proc)(samples)
    assert plain["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="token budget"):
        Collator(proc, pairs=True, token_budget=256)
    packed = Collator(proc, pairs=True, pack_length=256)(samples)  # the 6 sequences packed, chosen then rejected
    assert packed["num_pairs"] == 3 and packed["input_ids"].shape[0] < 6 and len(packed["pixel_values"]) == 6
    spans = {k: (r, start, n) for r, row in enumerate(packed["pack_layout"]) for k, start, n in row}
    for k, s in enumerate(samples):
        r, start, n = spans[3 + k]
        assert packed["input_ids"][r, start:start + n].tolist() == s["rejected_input_ids"]


# --------------------------------------------------------------------------------------------- the stage


def _dpo_recipe(tmp_path, data, reference="auto", llm="full", steps=6):
    import yaml

    recipe = yaml.safe_load(open("recipes/tiny.yaml"))
    recipe["plugins"]["shapes_demo"].update(train_images=48, heldout_images=4, blind_twin=False)
    recipe["model"]["llm"]["config"]["num_hidden_layers"] = 1
    recipe["model"]["vision"]["config"]["num_hidden_layers"] = 1
    sft = dict(recipe["stages"][0], max_steps=2, global_batch_size=8, per_device_batch_size=4)
    dpo = {"name": "dpo", "template": "vicuna_v1", "objective": "dpo", "beta": 0.5, "reference": reference,
           "data": {"sources": [{"path": str(data)}]},
           "trainable": {"vision": "frozen", "connector": "full", "llm": llm},
           "lr": {"connector": 2e-3, "llm": 2e-3}, "max_steps": steps, "global_batch_size": 8,
           "per_device_batch_size": 4, "warmup_ratio": 0.0}
    recipe["stages"] = [sft, dpo]
    recipe["train"].update(output_dir=str(tmp_path / "run"), log_every=2, save_every=1, keep_last=10)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _shapes_pairs(root, n=16, long_rejected=False):
    import numpy as np

    from mmkit.demo import shapes

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        img, scene = shapes.render_scene(rng, 32)
        img.save(root / "img" / f"{k}.png")
        o = scene[0]
        q = f"is there a {o['color']} {o['shape']} ?"
        # long_rejected: every other pair's rejected answer longer, so the padded rows hold padding
        bad = f"no there is a {o['color']} {o['shape']}" if long_rejected and k % 2 else "no"
        rows.append({"id": str(k), "image": f"img/{k}.png", "question": q, "chosen": "yes", "rejected": bad})
    path = root / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def _run(recipe, *extra, check=True, faults=()):
    import os
    import subprocess
    import sys

    entry = ["-m", "tests.faults", "train", *faults, "--"] if faults else ["-m", "mmkit.train"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, *entry, str(recipe), *extra], capture_output=True, text=True,
                          timeout=500, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_sft_then_dpo_stage_lowers_the_dpo_loss(tmp_path):
    recipe = _dpo_recipe(tmp_path, _shapes_pairs(tmp_path / "pairs"))
    proc = _run(recipe)
    rows = [r for r in _rows(tmp_path / "run") if r["stage"] == 1]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= r.keys()
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3  # step 1: policy = reference, -log sigmoid(0)
    assert rows[0]["reward_margin"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["reward_accuracy"] > 0.5
    log_text = proc.stdout + proc.stderr
    assert "DPO reward margin" in log_text and "reference: a frozen copy" in log_text
    assert (tmp_path / "run" / "dpo_reference" / "stage1.pt").is_file()


def test_dpo_stage_resumes_bit_identically_after_a_kill(tmp_path):
    data = _shapes_pairs(tmp_path / "pairs")
    ref_dir, killed_dir = tmp_path / "a", tmp_path / "b"
    ref_dir.mkdir()
    killed_dir.mkdir()
    _run(_dpo_recipe(ref_dir, data, steps=4))
    recipe = _dpo_recipe(killed_dir, data, steps=4)
    proc = _run(recipe, faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137
    _run(recipe, "--resume")
    _assert_resumed_run_is_identical(ref_dir, killed_dir)


def test_lora_dpo_stage_uses_the_disabled_adapter_as_reference(tmp_path):
    recipe = _dpo_recipe(tmp_path, _shapes_pairs(tmp_path / "pairs"), llm="lora", steps=4)
    proc = _run(recipe, "stages[1].lora_r=4", "stages[1].lora_alpha=8", "stages[1].lora_dropout=0.0",
                "stages[1].lr.llm=1.0e-2")
    rows = [r for r in _rows(tmp_path / "run") if r["stage"] == 1]
    assert "reference: the model with its LoRA adapters disabled" in proc.stdout + proc.stderr
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3  # a fresh adapter (B = 0) is the reference
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert not (tmp_path / "run" / "dpo_reference").exists()  # no second copy of the model


def _assert_resumed_run_is_identical(ref_dir, killed_dir):
    """The run killed at 1:2 and resumed logged every step of the uninterrupted one with bit-identical losses and
    reward margins, and ended with bit-identical weights."""
    from safetensors.torch import load_file

    a, b = _rows(ref_dir / "run"), _rows(killed_dir / "run")
    assert [(r["stage"], r["step"]) for r in b] == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["reward_margin"] for r in a if r["stage"] == 1] == [r["reward_margin"] for r in b if r["stage"] == 1]
    wa, wb = load_file(str(ref_dir / "run" / "final" / "model.safetensors")), load_file(
        str(killed_dir / "run" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _same(a, b, keys=("loss", "grad_norm", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"),
          tol=1e-6):
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in keys:
            assert abs(x.get(key, 0.0) - y.get(key, 0.0)) <= tol, (key, x, y)


def test_precomputed_reference_equals_a_frozen_copy(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    data = _shapes_pairs(tmp_path / "pairs")
    runs = {}
    for ref, workers in (("copy", 0), ("precomputed", 1)):  # one DataLoader worker scores and trains the latter
        (tmp_path / ref).mkdir()
        runs[ref] = _run(_dpo_recipe(tmp_path / ref, data, reference=ref, steps=4),
                         f"stages[1].data.num_workers={workers}")
    log_text = runs["precomputed"].stdout + runs["precomputed"].stderr
    assert "reference: log-probs precomputed with the stage's starting weights" in log_text
    assert "scoring the 16 pairs" in log_text
    a, b = _rows(tmp_path / "copy" / "run"), _rows(tmp_path / "precomputed" / "run")
    assert len(b) == 6 and b[-1]["reward_margin"] > 0  # training moved away from the reference
    _same(a, b)  # losses, gradient norms and reward metrics of every step
    wa = load_file(str(tmp_path / "copy" / "run" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "precomputed" / "run" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)
    ref_dir = tmp_path / "precomputed" / "run" / "dpo_reference"
    assert sorted(p.name for p in ref_dir.iterdir()) == ["stage1.safetensors"]  # no copy of the model
    with safe_open(str(ref_dir / "stage1.safetensors"), framework="pt") as fh:
        table = fh.get_tensor("logps")
        assert len(fh.metadata()["fingerprint"]) == 64
    assert table.shape == (16, 2) and torch.isfinite(table).all() and (table < 0).all()


def test_packed_dpo_stage_matches_the_padded_one(tmp_path):
    # packed with a precomputed reference: the table is scored through the packed collator too (a packed frozen
    # copy scores with the same function as the policy, compared packed against padded above)
    data = _shapes_pairs(tmp_path / "pairs", long_rejected=True)
    runs = {}
    for name, ref, extra in (("padded", "copy", ()), ("packed", "precomputed", ("stages[1].data.packing=true",))):
        (tmp_path / name).mkdir()
        runs[name] = _run(_dpo_recipe(tmp_path / name, data, reference=ref, steps=3), *extra)
    assert "packing each micro-batch into rows" in runs["packed"].stdout + runs["packed"].stderr
    a, b = _rows(tmp_path / "padded" / "run"), _rows(tmp_path / "packed" / "run")
    _same(a, b, tol=1e-5)  # losses, gradient norms and reward metrics of every step
    share = [sum(r["pad_share"] for r in rows if r["stage"] == 1) for rows in (a, b)]
    assert share[1] < share[0], share  # the packed stage really packed
    assert a[-1]["reward_margin"] != 0.0  # training moved away from the reference


def test_precomputed_reference_resumes_bit_identically_and_refuses_changed_data(tmp_path):
    data = _shapes_pairs(tmp_path / "pairs")
    ref_dir, killed_dir = tmp_path / "a", tmp_path / "b"
    ref_dir.mkdir()
    killed_dir.mkdir()
    _run(_dpo_recipe(ref_dir, data, reference="precomputed", steps=4))
    recipe = _dpo_recipe(killed_dir, data, reference="precomputed", steps=4)
    proc = _run(recipe, faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137
    table = killed_dir / "run" / "dpo_reference" / "stage1.safetensors"
    written = table.read_bytes()

    # the data changed under the killed run: one pair's answers swapped -> refused before training
    original = data.read_text()
    rows = json.loads(original)
    rows[0]["chosen"], rows[0]["rejected"] = rows[0]["rejected"], rows[0]["chosen"]
    data.write_text(json.dumps(rows))
    proc = _run(recipe, "--resume", check=False)
    assert proc.returncode != 0
    assert "holds the reference log-probs of other data than this stage's" in proc.stderr, proc.stderr[-2000:]
    data.write_text(original)

    proc = _run(recipe, "--resume")
    assert "reference log-probs of 16 pairs reused from" in proc.stdout + proc.stderr
    assert table.read_bytes() == written
    _assert_resumed_run_is_identical(ref_dir, killed_dir)


def test_dpo_stage_checks(tmp_path):
    from mmkit.recipe import RecipeError, load_recipe

    data = _shapes_pairs(tmp_path / "pairs", n=4)
    recipe = _dpo_recipe(tmp_path, data)
    with pytest.raises(RecipeError, match=r"stages\[1\].beta"):
        load_recipe(recipe, ["stages[1].beta=0"])
    with pytest.raises(RecipeError, match=r"stages\[1\].reference: 'adapter' needs"):
        load_recipe(recipe, ["stages[1].reference=adapter"])
    with pytest.raises(RecipeError, match=r"stages\[1\].loss_type"):
        load_recipe(recipe, ["stages[1].loss_type=hinge"])
    with pytest.raises(RecipeError, match=r"stages\[1\].reference: expected one of .*'precomputed'"):
        load_recipe(recipe, ["stages[1].reference=frozen"])
    proc = _run(recipe, "stages[1].data.batch_by_tokens=512", check=False)
    assert proc.returncode != 0 and "objective dpo does not take stages[1].data.batch_by_tokens" in proc.stderr


def test_shapes_dpo_split_and_false_yes_rate(tmp_path):
    import hashlib

    from mmkit.demo.options import resolve_shapes_source
    from mmkit.demo.scorer import false_yes_rate
    from mmkit.demo.shapes import write_dataset

    paths = write_dataset(tmp_path / "shapes", n_train_images=12, n_heldout=2)
    digest = {p: hashlib.sha256(paths[p].read_bytes()).hexdigest() for p in ("stage1", "stage2", "manifest")}
    ctx = SimpleNamespace(data_dir=tmp_path, plugins={"shapes_demo": {"train_images": 12, "heldout_images": 2}},
                          template="vicuna_v1")
    path, folder = resolve_shapes_source("dpo", ctx)
    rows = json.loads(open(path).read())
    assert len(rows) == 24 and {r["id"].rsplit("_", 1)[1] for r in rows} == {"exists", "color"}
    stage2 = {r["id"]: r for r in json.loads(paths.stage2.read_text())}
    for r in rows:
        assert r["chosen"] != r["rejected"] and "<image>" not in r["question"]
        turns = stage2[r["id"].rsplit("_", 1)[0]]["conversations"]
        truth = {t["value"].replace("<image>\n", ""): a["value"] for t, a in zip(turns[0::2], turns[1::2])}
        assert truth[r["question"]] == r["chosen"]
        if r["id"].endswith("exists"):
            assert {r["chosen"], r["rejected"]} == {"yes", "no"}
    assert {p: hashlib.sha256(paths[p].read_bytes()).hexdigest() for p in digest} == digest  # untouched
    assert resolve_shapes_source("dpo", ctx)[0] == path

    key = [{"question_id": "a", "answer": "no", "category": "exists"},
           {"question_id": "b", "answer": "no", "category": "exists"},
           {"question_id": "c", "answer": "yes", "category": "exists"},
           {"question_id": "d", "answer": "no", "category": "count"}]
    said = [{"question_id": "a", "text": "Yes."}, {"question_id": "b", "text": "no"},
            {"question_id": "c", "text": "yes"}, {"question_id": "d", "text": "yes"}]
    assert false_yes_rate(said, key) == {"questions": 2, "false_yes": 1, "rate": 50.0}


@pytest.mark.parametrize("strategy,reference", [("ddp", "auto"), ("fsdp", "copy")], ids=["ddp", "fsdp"])
def test_two_processes_match_one_in_a_dpo_stage(tmp_path, strategy, reference):
    import os
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found")
    data = _shapes_pairs(tmp_path / "pairs")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # 2 processes x per-device batch 4 x 1 accumulation step = the 1-process run's 4 x 2
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train",
                           str(_dpo_recipe(two, data, reference=reference, steps=3)), "train.save_every=0",
                           f"train.strategy={strategy}"],
                          capture_output=True, text=True, timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if strategy == "fsdp":  # FSDP2 modules cannot be deep-copied: refused with one line before training
        assert proc.returncode != 0 and "a frozen copy is not supported with train.strategy fsdp" in proc.stderr
        assert "set stages[1].reference: precomputed" in proc.stderr  # what works instead
        return
    _run(_dpo_recipe(one, data, steps=3), "train.save_every=0")
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "File" in line]
    assert proc.returncode == 0, "\n".join(errors[-40:])
    a, b = _rows(one / "run"), _rows(two / "run")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
        for key in ("reward_margin", "reward_accuracy"):
            assert abs(x.get(key, 0) - y.get(key, 0)) <= 1e-5, (key, x, y)


def _torchrun(recipe, *extra):
    import os
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train", str(recipe),
                           *extra], capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "File" in line]
    assert proc.returncode == 0, "\n".join(errors[-40:]) or proc.stderr[-3000:]
    return proc


def test_precomputed_reference_under_ddp_and_fsdp_matches_one_process(tmp_path):
    """1 process, 2 DDP processes (each scoring its share of the pairs with a DataLoader worker, gathered) and 2
    FSDP2 processes (the sharded model scores; ``auto`` is ``precomputed`` under fsdp), also with packing, give the
    same losses and reward metrics, and the same table of reference log-probs."""
    from safetensors.torch import load_file

    data = _shapes_pairs(tmp_path / "pairs")
    dirs = {k: tmp_path / k for k in ("one", "ddp", "fsdp", "fsdp_packed")}
    for d in dirs.values():
        d.mkdir()
    _run(_dpo_recipe(dirs["one"], data, reference="precomputed", steps=3), "train.save_every=0")
    _torchrun(_dpo_recipe(dirs["ddp"], data, reference="precomputed", steps=3), "train.save_every=0",
              "train.strategy=ddp", "stages[1].data.num_workers=1")
    # keep_last=1: the demo's before-DPO figures read a stage-0 checkpoint as model.safetensors, which a sharded
    # (FSDP) checkpoint does not have; with it pruned the report leaves those figures out
    proc = _torchrun(_dpo_recipe(dirs["fsdp"], data, steps=3), "train.save_every=0", "train.strategy=fsdp",
                     "train.keep_last=1")
    assert "reference: log-probs precomputed with the stage's starting weights" in proc.stdout + proc.stderr
    # and packed: the same steps from rows of several sequences each, scored and trained sharded
    proc = _torchrun(_dpo_recipe(dirs["fsdp_packed"], data, steps=3), "train.save_every=0", "train.strategy=fsdp",
                     "train.keep_last=1", "stages[1].data.packing=true")
    assert "packing each micro-batch into rows" in proc.stdout + proc.stderr
    rows = {k: _rows(d / "run") for k, d in dirs.items()}
    assert len(rows["one"]) == 5 and rows["one"][-1]["reward_margin"] > 0
    keys = ("loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected")
    _same(rows["one"], rows["ddp"], keys, tol=1e-5)
    _same(rows["ddp"], rows["fsdp"], keys + ("grad_norm",), tol=1e-5)
    _same(rows["fsdp"], rows["fsdp_packed"], keys + ("grad_norm",), tol=1e-5)
    tables = {k: load_file(str(d / "run" / "dpo_reference" / "stage1.safetensors"))["logps"] for k, d in dirs.items()}
    assert torch.allclose(tables["one"], tables["ddp"], atol=1e-5, rtol=0)
    assert torch.allclose(tables["ddp"], tables["fsdp"], atol=1e-5, rtol=0)


def test_lora_adapter_reference_under_fsdp_matches_ddp(tmp_path):
    """A LoRA DPO stage (the disabled adapter as reference) as stages[0]: 2 FSDP2 processes train as 2 DDP
    processes, and the final save (adapter and merged model, from the gathered shards) is the same."""
    import yaml
    from safetensors.torch import load_file

    data = _shapes_pairs(tmp_path / "pairs")
    lora = ["stages[0].lora_r=4", "stages[0].lora_alpha=8", "stages[0].lora_dropout=0.0", "stages[0].lr.llm=1.0e-2",
            "train.save_every=0", "train.keep_last=1"]
    runs = {}
    for strategy in ("ddp", "fsdp"):
        (tmp_path / strategy).mkdir()
        recipe = _dpo_recipe(tmp_path / strategy, data, llm="lora", steps=3)
        spec = yaml.safe_load(recipe.read_text())
        spec["stages"] = spec["stages"][1:]  # the DPO stage alone: its adapters exist before FSDP2 shards
        recipe.write_text(yaml.safe_dump(spec))
        runs[strategy] = _torchrun(recipe, *lora, f"train.strategy={strategy}")
    assert "reference: the model with its LoRA adapters disabled" in runs["fsdp"].stdout + runs["fsdp"].stderr
    a, b = _rows(tmp_path / "ddp" / "run"), _rows(tmp_path / "fsdp" / "run")
    assert len(a) == 3 and abs(a[0]["loss"] - 0.6931) < 1e-3 and a[-1]["loss"] < a[0]["loss"]
    _same(a, b, tol=1e-5)
    for name in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = (load_file(str(tmp_path / k / "run" / name)) for k in ("ddp", "fsdp"))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa), name


def test_lora_added_after_fsdp_sharded_the_model_is_refused(tmp_path):
    import os
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not found")
    (tmp_path / "run").mkdir()
    recipe = _dpo_recipe(tmp_path / "run", _shapes_pairs(tmp_path / "pairs", n=8), llm="lora", steps=1)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmkit.train", str(recipe),
                           "train.save_every=0", "train.strategy=fsdp"], capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "stages[1].trainable.llm: lora under train.strategy fsdp only from stages[0] on" in proc.stderr, \
        proc.stderr[-3000:]
