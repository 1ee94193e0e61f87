"""Training batches from DataLoader worker processes: the same batches, losses and weights as loading in the
training process, exact resume after a kill, skip counts merged across workers, data_wait in the metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmkit.data.loader import build_loader, default_num_workers
from mmkit.recipe import RecipeError, load_recipe
from tests.test_train import _write_bad_dataset, run_train, weights


def workers(n: int) -> list[str]:
    """``data.num_workers=n`` for both stages of recipes/tiny.yaml (stage 1 has its own ``data:``)."""
    return [f"data.num_workers={n}", f"stages[1].data.num_workers={n}"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("w0")
    return out, run_train(out, *workers(0), "train.log_every=2")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("w2")
    return out, run_train(out, *workers(2), "train.log_every=2")


def test_two_workers_give_bit_identical_losses_and_weights(in_process, two_workers):
    (a, _), (b, _) = in_process, two_workers
    rows_a, rows_b = metrics(a), metrics(b)
    assert len(rows_a) == len(rows_b) == 7
    drop = lambda r: {k: v for k, v in r.items() if k != "data_wait_s"}  # noqa: E731  (a time, not a result)
    assert [drop(r) for r in rows_a] == [drop(r) for r in rows_b]  # exact floats, not a tolerance
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_metrics_and_log_report_data_wait_and_workers(in_process, two_workers):
    for out, proc in (in_process, two_workers):
        rows = metrics(out)
        assert all(isinstance(r["data_wait_s"], float) and r["data_wait_s"] >= 0 for r in rows), rows
    log = two_workers[1].stdout
    assert "stage 0: data loaded by 2 DataLoader worker process(es) per training process (data.num_workers=2)" in log
    assert "(stages[1].data.num_workers=2)" in log
    assert "stage 1 instruct step 4/4:" in log and "data_wait " in log.split("step 4/4:")[1].splitlines()[0]
    assert "data loaded in each training process itself (no workers)" in in_process[1].stdout


def test_resume_with_workers_after_kill_is_bit_identical(in_process, tmp_path):
    ref, _ = in_process
    out = tmp_path / "killed"
    proc = run_train(out, *workers(2), faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (out / "final").exists()
    run_train(out, *workers(2), "--resume")
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [(r["stage"], r["step"]) for r in metrics(out)]
    assert steps == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4)]  # killed after 1:2, resumed at 1:3


def _skipped(run: Path) -> dict[str, dict]:
    """Skip counts (index-time records, load-time samples) in each checkpoint, by checkpoint name."""
    return {p.name: json.loads((p / "state.json").read_text())["skipped"]
            for p in sorted((run / "checkpoints").iterdir()) if not p.name.startswith(".")}


def test_skip_counts_with_workers_equal_those_without(tmp_path):
    data = _write_bad_dataset(tmp_path / "data")
    args = [f"data.sources=[{{path: {data}, image_folder: {data.parent / 'img'}}}]", "stages[0].template=vicuna_v1",
            "stages[1].data=null", "stages[1].max_steps=2", "plugins.shapes_demo.heldout_images=1"]
    runs = {}
    for n in (0, 2):
        out = tmp_path / f"w{n}"
        proc = run_train(out, *args, f"data.num_workers={n}")  # train.save_every=1: a checkpoint per step
        runs[n] = out
        assert "samples dropped when loading" in proc.stdout + proc.stderr
    without, with_workers = _skipped(runs[0]), _skipped(runs[2])
    assert len(without) == 5  # 3 + 2 steps
    # per step, so batches the workers had loaded ahead are not counted before they are trained on
    assert with_workers == without
    last = [without["stage0-step000003"], without["stage1-step000002"]]
    assert all(s["phases"]["index"] == 4 for s in last), last  # missing, twohumans, count, empty
    # 14 usable records, 8 drawn per step: the corrupt image was drawn, dropped when loading, each time counted
    assert all(s["counts"].get("corrupt_image", 0) >= 1 for s in last), last


# --------------------------------------------------------------------------- loader and recipe units


def test_default_num_workers_rule():
    assert default_num_workers(1, cpus=2) == 1 and default_num_workers(2, cpus=2) == 0
    assert default_num_workers(1, cpus=1) == 0 and default_num_workers(1, cpus=64) == 4
    assert default_num_workers(8, cpus=16) == 1 and default_num_workers(8, cpus=96) == 4


def test_building_a_loader_leaves_the_global_rng_alone():
    ds = list(range(8))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = build_loader(ds, [[0, 1], [2, 3]], lambda xs: xs, num_workers=0)
    assert list(loader) == [[0, 1], [2, 3]]
    assert torch.equal(torch.rand(3), expected)  # the workers' base seed came from the loader's own generator


@pytest.mark.parametrize("override,key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("stages[1].data.num_workers=-1", "stages[1].data.num_workers"),
    ("data.prefetch_factor=0", "data.prefetch_factor"),
])
def test_recipe_rejects_bad_loader_settings(override, key):
    with pytest.raises(RecipeError, match=re.escape(key) + ": expected"):
        load_recipe("recipes/tiny.yaml", [override])


def test_recipe_num_workers_is_a_field_again():
    r = load_recipe("recipes/tiny.yaml", ["data.num_workers=3", "data.prefetch_factor=4"])
    assert (r.data.num_workers, r.data.prefetch_factor) == (3, 4)
    assert load_recipe("recipes/tiny.yaml").data.num_workers is None  # unset: the default rule
    assert [s.data.num_workers for s in load_recipe("recipes/llava15.yaml").stages if s.data] == [4]
