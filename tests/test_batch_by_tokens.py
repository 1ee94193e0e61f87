"""data.batch_by_tokens: micro-batches sized by a token budget. The split keeps every sample of a step exactly once
and every micro-batch within the budget (padded and packed); training gives the losses and weights of the
count-sized run (the step's samples are the same, only their grouping into micro-batches differs); 2 processes
with different numbers of micro-batches per rank in tests/test_distributed.py."""

from __future__ import annotations

import json
import random

import pytest

from mmkit.data.collate import Collator
from mmkit.data.packing import token_budget_groups
from mmkit.processing.processor import MultimodalProcessor
from mmkit.recipe import RecipeError, load_recipe
from mmkit.train.__main__ import main as train_main
from tests.test_train import run_train, weights

TOL = 1e-5


def test_groups_by_hand_padded_and_packed():
    lengths = [100, 60, 60, 60, 60]
    # padded: a micro-batch costs rows x its longest: 100+60 -> 2 x 100; then 60, 60, 60 -> 3 x 60
    assert token_budget_groups(lengths, 256) == [[[0], [1]], [[2], [3], [4]]]
    # packed at 256: first-fit-decreasing rows 100+60+60 and 60+60; 2 x 220 > 256, so one row per micro-batch
    assert token_budget_groups(lengths, 256, pack_length=256) == [[[0, 1, 2]], [[3, 4]]]
    assert token_budget_groups(lengths, 512, pack_length=256) == [[[0, 1, 2], [3, 4]]]
    with pytest.raises(ValueError, match="a row of 100 tokens does not fit data.batch_by_tokens=99"):
        token_budget_groups(lengths, 99)


@pytest.mark.parametrize("pack_length", [None, 64])
def test_groups_cover_every_sample_once_within_budget(pack_length):
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(64, 600)
        groups = token_budget_groups(lengths, budget, pack_length)
        assert sorted(i for g in groups for row in g for i in row) == list(range(len(lengths)))
        for g in groups:
            widths = [sum(lengths[i] for i in row) for row in g]
            assert len(g) * max(widths) <= budget
            assert pack_length is None or max(widths) <= pack_length
        assert groups == token_budget_groups(lengths, budget, pack_length)  # deterministic


class _Proc(MultimodalProcessor):  # pad() and pad_token_id (0 without a tokenizer) are all Collator needs
    def __init__(self):
        self.tokenizer = None


def _sample(n: int, sid: str) -> dict:
    ids = list(range(1, n + 1))
    return {"id": sid, "input_ids": ids, "labels": [-100] + ids[1:]}


@pytest.mark.parametrize("pack_length", [None, 16])
def test_collator_cuts_a_step_into_micro_batches(pack_length):
    samples = [_sample(n, f"s{k}") for k, n in enumerate([9, 3, 7, 5, 2, 8, 4])]
    batch = Collator(_Proc(), pack_length=pack_length, token_budget=16)(samples)
    micro = batch["micro_batches"]
    assert len(micro) > 1 and all(m["input_ids"].numel() <= 16 for m in micro)
    assert batch["num_tokens"] == 38 and batch["num_samples"] == 7
    assert batch["num_slots"] == sum(m["input_ids"].numel() for m in micro)
    # every sample's tokens appear once, with their labels
    supervised = sum(int((m["labels"] != -100).sum()) for m in micro)
    assert supervised == 38 - 7
    got = sorted(int(x) for m in micro for x in m["input_ids"][m["labels"] != -100].flatten())
    want = sorted(x for s in samples for x, y in zip(s["input_ids"], s["labels"]) if y != -100)
    assert got == want


def test_recipe_key_checked():
    r = load_recipe("recipes/tiny.yaml", ["data.batch_by_tokens=1024"])
    assert r.data.batch_by_tokens == 1024 and r.stages[1].data.batch_by_tokens is None
    with pytest.raises(RecipeError, match=r"data.batch_by_tokens: expected a positive number of tokens of at "
                                          r"least one row \(model.max_length = 256\), got 100"):
        load_recipe("recipes/tiny.yaml", ["data.batch_by_tokens=100"])
    with pytest.raises(RecipeError, match=r"pack_length = 512\), got 300"):
        load_recipe("recipes/tiny.yaml", ["data.packing=true", "data.pack_length=512", "data.batch_by_tokens=300"])


def test_dry_run_shows_the_budget(capsys):
    assert train_main(["recipes/tiny.yaml", "--dry-run", "stages[1].data.batch_by_tokens=2048"]) == 0
    out = capsys.readouterr().out.split("stage 1 'instruct'")
    assert "batch_by_tokens" not in out[0] and "micro-batches of at most 2048 tokens" in out[1]


# --------------------------------------------------------------------------------------------- training runs

# the reference: global batch 8 in one micro-batch per step; the budget run cuts the same 8 samples by tokens
ONE_MICRO = ["stages[0].per_device_batch_size=8", "stages[1].per_device_batch_size=8"]
BUDGET = ["data.batch_by_tokens=256", "stages[1].data.batch_by_tokens=300"]


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_budget_run_equals_count_run(tmp_path, packing):
    pack = ["data.packing=true", "stages[1].data.packing=true"] if packing else []
    ref, got = tmp_path / "count", tmp_path / "tokens"
    run_train(ref, *ONE_MICRO, *pack, "train.save_every=0")
    proc = run_train(got, *ONE_MICRO, *pack, *BUDGET, "train.save_every=0")
    assert "stage 1: micro-batches of at most 300 tokens (data.batch_by_tokens" in proc.stderr + proc.stdout
    a, b = _metrics(ref), _metrics(got)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b] and len(a) == 7
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= TOL
    wa, wb = weights(ref), weights(got)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOL
