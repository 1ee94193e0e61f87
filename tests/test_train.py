"""python -m mmkit.train: dry runs, exact resume after a kill, LoRA merge, bad data that still trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmkit
from mmkit.train.__main__ import main as train_main

SMALL = [
    "plugins.shapes_demo.train_images=48", "plugins.shapes_demo.heldout_images=4",
    "plugins.shapes_demo.blind_twin=false",
    "stages[0].max_steps=3", "stages[1].max_steps=4",
    "stages[0].global_batch_size=8", "stages[0].per_device_batch_size=4",
    "stages[1].global_batch_size=8", "stages[1].per_device_batch_size=4",
    "train.save_every=1", "train.keep_last=10",
    "model.llm.config.num_hidden_layers=1", "model.vision.config.num_hidden_layers=1",
]


def run_train(out: Path, *extra, env=None, check=True, faults=()):
    """``faults``: options of tests/faults.py (e.g. ``("--kill-at", "1:2")``) to run the CLI under."""
    entry = ["-m", "tests.faults", "train", *faults, "--"] if faults else ["-m", "mmkit.train"]
    cmd = [sys.executable, *entry, "recipes/tiny.yaml", *SMALL, f"train.output_dir={out}", *extra]
    env = {**os.environ, **(env or {})}
    if faults:  # tests.faults must be importable
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = run_train(out)
    return out, proc


def test_demo_pipeline_end_to_end(reference_run):
    out, proc = reference_run
    text = proc.stdout
    assert "held-out accuracy:" in text and "sample chat" in text
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "recipe.yaml").is_file() and (out / "final" / "recipe.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in rows)
    model = mmkit.load(out / "final")
    assert model.recipe.model.template == "vicuna_v1"


def test_resume_after_kill_is_bit_identical(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed"
    proc = run_train(out, faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137
    assert not (out / "final").exists()
    run_train(out, "--resume")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4)]
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_kill_during_checkpoint_write_keeps_previous(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "killed_in_save"
    proc = run_train(out, faults=["--kill-in-save", "2"], check=False)  # save_every=1: the step-2 save
    assert proc.returncode == 137
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["stage0-step000001"]  # the half-written step-2 save never took a real name
    run_train(out, "--resume")
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_a_corrupt_latest_checkpoint(reference_run, tmp_path):
    ref, _ = reference_run
    out = tmp_path / "corrupt_latest"
    proc = run_train(out, faults=["--kill-at", "1:2"], check=False)
    assert proc.returncode == 137
    latest = sorted((out / "checkpoints").glob("stage*"))[-1]
    weights_file = latest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:512])  # a full disk / cut copy: truncated, name intact
    proc = run_train(out, "--resume")
    assert f"--resume: skipping {latest.name}, it cannot be loaded" in proc.stdout + proc.stderr
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_changed_recipe_is_refused_and_the_record_kept(tmp_path):
    out = tmp_path / "changed"
    proc = run_train(out, faults=["--kill-at", "0:2"], check=False)
    assert proc.returncode == 137
    before = (out / "recipe.yaml").read_bytes()
    proc = run_train(out, "--resume", "stages[1].lr.llm=0.5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--resume: the recipe differs" in proc.stderr and "stages[1].lr.llm: 0.001 -> 0.5" in proc.stderr
    assert (out / "recipe.yaml").read_bytes() == before  # the run's record still says what trained
    # allowed explicitly: it trains on with the new rate, and the record says so
    proc = run_train(out, "--resume", "stages[1].lr.llm=0.5", "--resume-changed", "stages[1].lr", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stages[1].lr.llm: 0.001 -> 0.5" in proc.stdout + proc.stderr
    assert mmkit.load_recipe(out / "recipe.yaml").stages[1].lr.llm == 0.5
    last = sorted((out / "checkpoints").glob("stage1-*"))[-1]
    groups = torch.load(last / "optimizer.pt", weights_only=True)["optimizer"]["param_groups"]
    llm = [g for g in groups if g["name"].startswith("llm")]
    assert llm and all(g["initial_lr"] == 0.5 for g in llm)  # the new rate really trained


def test_a_run_that_can_train_nothing_fails_with_one_line(tmp_path):
    # 16 tokens cannot hold a 16-token image plus any text: every sample is dropped when loaded
    proc = run_train(tmp_path / "nothing", "model.max_length=16", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no supervised token in the whole global batch" in proc.stderr and "too long" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "nothing" / "final").exists()


def test_dry_run_tiny_and_llava15_with_tiny_parts(capsys):
    assert train_main(["recipes/tiny.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 0 'align'" in out and "stage 1 'instruct'" in out and "GiB" in out
    for recipe, overlay in [("llava15", "tiny_parts"), ("llava15_lora", "tiny_parts")]:
        assert train_main([f"recipes/{recipe}.yaml", "--dry-run", f"recipes/overlays/{overlay}.yaml"]) == 0
        out = capsys.readouterr().out
        assert "stage 0 'pretrain'" in out and "stage 1 'finetune'" in out
        assert "global batch 256" in out and "global batch 128" in out
    assert "llm       lora" in out


@pytest.mark.parametrize("recipe,overlay", [("llava_next", "tiny_parts_next"),
                                            ("onevision_qwen2", "tiny_parts_onevision")])
def test_dry_run_next_and_onevision(recipe, overlay, capsys):
    assert train_main([f"recipes/{recipe}.yaml", f"recipes/overlays/{overlay}.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "vision    full" in out and "lr 2e-06" in out


def test_lora_stage_saves_adapter_and_merges_exactly(tmp_path):
    out = tmp_path / "lora"
    run_train(out, "stages[1].trainable={vision: frozen, connector: full, llm: lora}",
               "stages[1].lr={connector: 1.0e-3, llm: 1.0e-3}", "stages[1].lora_r=4", "stages[1].lora_alpha=8")
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = mmkit.load(out / "final").eval()
    # rebuild the adapted model from the last checkpoint (LoRA-wrapped) and compare logits
    from mmkit.train.checkpoint import latest_checkpoint, load_checkpoint
    from mmkit.train.stages import set_trainable

    adapted = mmkit.load(out / "final").eval()
    recipe = adapted.recipe
    set_trainable(adapted, recipe.stages[1])
    load_checkpoint(latest_checkpoint(out / "checkpoints"), adapted)
    adapted.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        a = adapted(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    lora_a = [k for k in adapted.state_dict() if "lora_A" in k]
    assert lora_a and all("lm_head" not in k for k in lora_a)


def _write_bad_dataset(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(root / "img" / "ok.png")
    (root / "img" / "corrupt.png").write_bytes(b"not a png at all")
    good = {"conversations": [{"from": "human", "value": "<image>\nwhat color is the circle ?"},
                              {"from": "gpt", "value": "red"}], "image": "ok.png"}
    records = [dict(good, id=f"good{i}") for i in range(12)]
    records += [
        dict(good, id="missing", image="nope.png"),
        dict(good, id="corrupt", image="corrupt.png"),
        {"id": "twohumans", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "again"}]},
        {"id": "count", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\ntwo ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "empty", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nq ?"}, {"from": "gpt", "value": "  "}]},
        {"id": "textonly", "conversations": [{"from": "human", "value": "how many shapes ?"},
                                             {"from": "gpt", "value": "two"}]},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_corrupt_dataset_still_trains_and_reports(tmp_path):
    data = _write_bad_dataset(tmp_path / "data")
    out = tmp_path / "run"
    proc = run_train(out, f"data.sources=[{{path: {data}, image_folder: {data.parent / 'img'}}}]",
                     "stages[0].template=vicuna_v1", "stages[1].data=null", "stages[1].max_steps=2")
    log = proc.stdout + proc.stderr
    for rid in ("missing", "corrupt", "twohumans", "count", "empty"):
        assert rid in log, f"record {rid} not named in the log"
    assert "records skipped when indexing" in log and "samples dropped when loading" in log
    assert (out / "final" / "model.safetensors").is_file()
    strict = run_train(tmp_path / "strict", f"data.sources=[{{path: {data}, image_folder: {data.parent / 'img'}}}]",
                       "data.strict=true", check=False)
    assert strict.returncode != 0
    assert "missing" in strict.stderr or "missing" in strict.stdout


def test_qlora_stage_trains_and_merges_into_a_plain_checkpoint(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install 'mmkit[quant]')")
    out = tmp_path / "qlora"
    run_train(out, "stages[1].trainable={vision: frozen, connector: full, llm: qlora}",
              "stages[1].lr={connector: 1.0e-3, llm: 1.0e-3}", "stages[1].lora_r=4", "stages[1].lora_alpha=8",
              "train.save_every=0")
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = mmkit.load(out / "final").eval()
    assert all(type(m).__module__.startswith("torch") for m in merged.llm.modules() if "Linear" in type(m).__name__)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["loss"] == r["loss"] for r in rows)  # no NaN


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    out = tmp_path / "bf16"
    run_train(out, "train.bf16=true", "train.gradient_checkpointing=true", "train.save_every=0",
              "stages[0].max_steps=2", "stages[1].max_steps=2", "plugins.shapes_demo.heldout_images=1")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 < r["loss"] < 20 for r in rows)
    assert mmkit.load(out / "final").dtype == torch.float32  # autocast trains fp32 master weights


# --------------------------------------------------------------------------- plug-in hooks


@dataclass
class _FakeOptions:
    greeting: str = "hi"


class _FakePlugin:
    """A third-party style plug-in: only an options dataclass and the hooks it wants (no base class)."""

    options = _FakeOptions

    def __init__(self):
        self.calls = []

    def on_train_start(self, run, options):
        self.calls.append(("start", options, run.recipe_path, list(run.overrides), run.world_size,
                           (run.run_dir / "recipe.yaml").is_file(), (run.run_dir / "final").exists(),
                           run.model is not None))
        run.state["fake"] = "kept"

    def on_train_end(self, run, options):
        self.calls.append(("end", options, [r.name for r in run.results], run.final_dir,
                           (run.final_dir / "model.safetensors").is_file(), run.state.get("fake"),
                           hasattr(run.model, "chat")))


@pytest.fixture
def fake_plugin():
    from mmkit.registry import plugins

    plugin = _FakePlugin()
    plugins.register("fake_plugin", obj=plugin)
    yield plugin
    plugins.unregister("fake_plugin")


def test_run_hooks_calls_active_plugins_in_recipe_order(fake_plugin, tmp_path):
    from mmkit.plugin import Plugin, TrainRun
    from mmkit.registry import plugins
    from mmkit.train.__main__ import run_hooks

    order = []

    class Second(Plugin):  # the base class: hooks it does not override do nothing
        def on_train_end(self, run, options):
            order.append("second")

    plugins.register("second_plugin", obj=Second())
    try:
        recipe = mmkit.load_recipe("recipes/tiny.yaml", ["plugins={second_plugin: {}, fake_plugin: {greeting: yo}}"])
        assert list(recipe.plugins) == ["second_plugin", "fake_plugin"]
        run = TrainRun(recipe=recipe, run_dir=tmp_path, recipe_path="r.yaml", overrides=["a=1"])
        run_hooks("on_train_start", run)  # Second has no on_train_start of its own: nothing happens
        assert order == [] and [c[:4] for c in fake_plugin.calls] == [("start", _FakeOptions("yo"), "r.yaml", ["a=1"])]
        run.final_dir = tmp_path
        run_hooks("on_train_end", run)
    finally:
        plugins.unregister("second_plugin")
    assert order == ["second"] and fake_plugin.calls[1][0] == "end" and fake_plugin.calls[1][5] == "kept"


def test_train_cli_calls_a_runtime_plugin(fake_plugin, tmp_path):
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    data = _write_bad_dataset(tmp_path / "data")
    good = [r for r in json.loads(data.read_text()) if r["id"].startswith("good")]
    data.write_text(json.dumps(good))
    overrides = [*SMALL, f"data.sources=[{{path: {data}, image_folder: {data.parent / 'img'}}}]",
                 "stages[0].template=vicuna_v1", "stages[1].data=null", "stages[0].max_steps=1",
                 "stages[1].max_steps=1", "train.save_every=0", "plugins={fake_plugin: {greeting: hello}}",
                 f"train.output_dir={tmp_path / 'run'}"]
    try:
        assert train_main(["recipes/tiny.yaml", *overrides]) == 0
    finally:
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    start, end = fake_plugin.calls
    # start: after recipe.yaml is saved, before the final model; the command line as given
    assert start == ("start", _FakeOptions("hello"), "recipes/tiny.yaml", overrides, 1, True, False, True)
    assert end == ("end", _FakeOptions("hello"), ["align", "instruct"], tmp_path / "run" / "final", True, "kept", True)
    assert not (tmp_path / "run" / "heldout_metrics.json").exists()  # the demo plug-in is not active
    assert mmkit.load_recipe(tmp_path / "run" / "recipe.yaml").plugins == {"fake_plugin": _FakeOptions("hello")}
