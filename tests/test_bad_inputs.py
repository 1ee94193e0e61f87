"""A corpus of careless and hostile inputs -- recipes, data, checkpoints, targets -- each with its exit code and
message: a user mistake is one line (`error: WHERE: WHAT`) and exit 2, never a traceback, never a silent success.

(The server's request corpus is in tests/test_serve.py; its remaining items wait for the serving-engine rewrite.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmkit
from mmkit.train.__main__ import main as train_main

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
