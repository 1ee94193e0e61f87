"""``python -m mmkit.eval``: the demo benchmark end to end, resume, chunks, bad input, ScienceQA/MMBench
inputs, and the training-time EvalHook."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmkit
from mmkit.demo.plugin import ShapesDemoOptions, shapes_paths
from mmkit.eval import runner
from mmkit.eval.__main__ import main as eval_main
from mmkit.eval.formats import get_chunk
from mmkit.eval.scorers import read_annotations, read_answers, score

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_IDS = range(5)  # <unk> <s> </s> <pad> <image> of the builtin word tokenizer
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny demo model, random init; special-token LM-head rows zeroed so replies are non-empty words."""
    torch.manual_seed(0)
    model = mmkit.build(ROOT / "recipes" / "tiny.yaml").eval()
    with torch.no_grad():
        for i in SPECIAL_IDS:
            model.llm.lm_head.weight[i].zero_()
    return model.save(tmp_path_factory.mktemp("eval-model") / "tiny")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's held-out questions + answer key (4 images x 5 questions)."""
    return shapes_paths(tmp_path_factory.mktemp("eval-data") / "data",
                        ShapesDemoOptions(train_images=0, heldout_images=4))


def _questions(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _answers(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _run(model_dir, demo, answers, *extra):
    return eval_main(["--model", str(model_dir), "--questions", str(demo.heldout_questions),
                      "--image-folder", str(demo.image_folder), "--answers", str(answers),
                      "--max-new-tokens", "3", "--batch-size", "8", "--quiet", *extra])


@pytest.fixture(scope="module")
def reference(model_dir, demo, tmp_path_factory):
    """One uninterrupted in-process run: the answers every other run must reproduce."""
    out = tmp_path_factory.mktemp("eval-ref") / "answers.jsonl"
    assert _run(model_dir, demo, out) == 0
    return _answers(out)


class CountingBatches:
    """Wraps runner.answer_batch to count how many questions the model was asked."""

    def __init__(self, monkeypatch):
        self.asked: list = []
        real = runner.answer_batch

        def counting(model, questions, *a, **k):
            self.asked.extend(q["question_id"] for q in questions)
            return real(model, questions, *a, **k)

        monkeypatch.setattr(runner, "answer_batch", counting)


# --------------------------------------------------------------------------- end to end


def test_demo_benchmark_end_to_end(model_dir, demo, tmp_path):
    """python -m mmkit.eval (killed mid-write, then rerun) and python -m mmkit.eval.score, as subprocesses."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    answers, metrics_path = tmp_path / "answers.jsonl", tmp_path / "metrics.json"
    args = ["--model", str(model_dir), "--questions", str(demo.heldout_questions), "--image-folder",
            str(demo.image_folder), "--answers", str(answers), "--max-new-tokens", "3", "--batch-size", "8"]
    cmd = [sys.executable, "-m", "mmkit.eval", *args]
    # the process dies (no cleanup) after its first batch, in the middle of writing a line (tests/faults.py)
    crash = [sys.executable, "-m", "tests.faults", "eval", "--crash-after", "8", "--", *args]
    r = subprocess.run(crash, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 137, r.stderr
    before = answers.read_text()
    assert before.count("\n") == 8 and not before.endswith("\n")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "removed a partial last line" in r.stderr and "8 of 20 question(s) already answered" in r.stderr
    assert "answering" in r.stderr and "wrote 12 answer(s)" in r.stderr  # tqdm progress + summary
    assert answers.read_text().startswith(before[:before.rindex("\n") + 1])
    questions, rows = _questions(demo.heldout_questions), _answers(answers)
    assert len(rows) == len(questions) == 20
    assert [a["question_id"] for a in rows] == [q["question_id"] for q in questions]
    for q, a in zip(questions, rows):
        assert list(a) == ANSWER_KEYS
        assert a["prompt"] == q["text"] and a["model_id"] == "tiny" and a["metadata"] == {}
        assert re.fullmatch(r"[0-9a-f]{32}", a["answer_id"])
        assert isinstance(a["text"], str) and a["text"]  # non-empty: special tokens cannot be emitted
    assert len({a["answer_id"] for a in rows}) == 20

    s = subprocess.run([sys.executable, "-m", "mmkit.eval.score", "--task", "shapes", "--answers", str(answers),
                        "--annotations", str(demo.heldout_answers), "--output", str(metrics_path)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert s.returncode == 0, s.stderr
    assert "accuracy" in s.stdout
    m = json.loads(metrics_path.read_text())
    assert isinstance(m["accuracy"], float) and 0.0 <= m["accuracy"] <= 100.0
    assert m["n"] == 20 and m["n_missing"] == 0 and m["n_unknown"] == 0
    assert sum(c["n"] for c in m["per_category"].values()) == 20
    assert set(m["per_category"]) == {q["category"] for q in questions}


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--questions", "--image-folder", "--answers", "--template", "--batch-size",
                 "--max-new-tokens", "--temperature", "--num-chunks", "--chunk-idx", "--limit", "--format",
                 "--all-rounds", "--strict"):
        assert flag in out


# --------------------------------------------------------------------------- resume


def test_resume_after_crash_answers_only_the_rest(model_dir, demo, reference, tmp_path, monkeypatch, capsys):
    answers = tmp_path / "answers.jsonl"
    full = "".join(json.dumps(a) + "\n" for a in reference)
    lines = full.splitlines(keepends=True)
    kept = "".join(lines[:7])
    answers.write_text(kept + lines[7][: len(lines[7]) // 2])  # a crash in the middle of line 8
    counter = CountingBatches(monkeypatch)
    assert _run(model_dir, demo, answers) == 0
    err = capsys.readouterr().err
    assert "removed a partial last line" in err and "7 of 20 question(s) already answered" in err
    assert counter.asked == [a["question_id"] for a in reference[7:]]  # exactly the missing ones, in order
    text = answers.read_text()
    assert text.startswith(kept)  # what was answered before the crash is untouched
    rows = _answers(answers)
    assert [a["question_id"] for a in rows] == [a["question_id"] for a in reference]
    assert [a["text"] for a in rows] == [a["text"] for a in reference]  # greedy: same answers as one run

    counter.asked.clear()
    assert _run(model_dir, demo, answers) == 0  # all done: the model is not even loaded
    assert counter.asked == [] and answers.read_text() == text
    assert "nothing to do" in capsys.readouterr().err


def test_resume_keeps_a_complete_last_line_without_newline(model_dir, demo, reference, tmp_path, monkeypatch):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(a) + "\n" for a in reference[:4]) + json.dumps(reference[4]))
    counter = CountingBatches(monkeypatch)
    assert _run(model_dir, demo, answers, "--limit", "6") == 0
    assert counter.asked == [reference[5]["question_id"]]
    assert _answers(answers) [:5] == reference[:5]
    assert [a["question_id"] for a in _answers(answers)] == [a["question_id"] for a in reference[:6]]


def test_malformed_answers_file_is_an_error_and_left_untouched(model_dir, demo, reference, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    content = json.dumps(reference[0]) + "\n{not json\n" + json.dumps(reference[1]) + "\n"
    answers.write_text(content)
    assert _run(model_dir, demo, answers) == 2
    assert f"{answers}:2" in capsys.readouterr().err
    assert answers.read_text() == content


# --------------------------------------------------------------------------- chunks


def test_get_chunk_matches_llava():
    items = list(range(10))
    assert [get_chunk(items, 3, i) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(get_chunk(items, 4, i)) for i in range(4)] == [3, 3, 3, 1]
    assert [get_chunk(list(range(5)), 4, i) for i in range(4)] == [[0, 1], [2, 3], [4], []]  # LLaVA: IndexError
    assert get_chunk(items, 1, 0) == items
    with pytest.raises(ValueError):
        get_chunk(items, 3, 3)


def test_chunks_partition_the_questions(model_dir, demo, reference, tmp_path):
    parts = []
    for i in range(3):
        out = tmp_path / f"chunk{i}.jsonl"
        assert _run(model_dir, demo, out, "--num-chunks", "3", "--chunk-idx", str(i)) == 0
        parts.append(_answers(out))
    assert [len(p) for p in parts] == [7, 7, 6]  # ceil(20 / 3) = 7
    merged = [a for p in parts for a in p]  # cat chunk*.jsonl > merge.jsonl
    assert [a["question_id"] for a in merged] == [a["question_id"] for a in reference]
    assert [a["text"] for a in merged] == [a["text"] for a in reference]


def test_limit_applies_before_chunking(model_dir, demo, reference, tmp_path):
    out = tmp_path / "a.jsonl"
    assert _run(model_dir, demo, out, "--limit", "5", "--num-chunks", "2", "--chunk-idx", "1") == 0
    assert [a["question_id"] for a in _answers(out)] == [a["question_id"] for a in reference[3:5]]


def test_bad_chunk_index_is_an_error(model_dir, demo, tmp_path, capsys):
    assert _run(model_dir, demo, tmp_path / "a.jsonl", "--num-chunks", "2", "--chunk-idx", "2") == 2
    assert "--chunk-idx" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


def _bad_question_file(demo, tmp_path) -> Path:
    qs = _questions(demo.heldout_questions)[:4]
    lines = [
        json.dumps(qs[0]),                                   # 1 ok
        "{broken json",                                      # 2 malformed
        json.dumps(qs[1]),                                   # 3 ok
        json.dumps({**qs[2], "question_id": qs[0]["question_id"]}),  # 4 duplicate of line 1
        json.dumps({**qs[3], "image": "images/nope.png"}),  # 5 missing image
        json.dumps({"question_id": "no-text"}),              # 6 missing text
        "",                                                  # blank lines are fine
        json.dumps({**qs[3], "question_id": "ok-3"}),        # 8 ok
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_questions_are_skipped_with_line_numbers(model_dir, demo, tmp_path, capsys):
    q = _bad_question_file(demo, tmp_path)
    out = tmp_path / "a.jsonl"
    rc = eval_main(["--model", str(model_dir), "--questions", str(q), "--image-folder", str(demo.image_folder),
                    "--answers", str(out), "--max-new-tokens", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"{q}:2: malformed JSON" in err
    assert f"{q}:4: duplicate question_id" in err and f"first seen at {q}:1" in err
    assert f"{q}:5: image not found" in err
    assert f"{q}:6: missing 'text'" in err
    assert "skipped 4 bad question(s)" in err
    good = _questions(demo.heldout_questions)
    assert [a["question_id"] for a in _answers(out)] == [good[0]["question_id"], good[1]["question_id"], "ok-3"]


def test_strict_stops_before_answering_and_keeps_existing_answers(model_dir, demo, tmp_path, capsys):
    q = _bad_question_file(demo, tmp_path)
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": "earlier", "text": "kept"}\n')
    rc = eval_main(["--model", str(model_dir), "--questions", str(q), "--image-folder", str(demo.image_folder),
                    "--answers", str(out), "--strict", "--quiet"])
    assert rc == 2
    assert "4 bad question(s)" in capsys.readouterr().err
    assert out.read_text() == '{"question_id": "earlier", "text": "kept"}\n'


def test_unreadable_image_is_skipped_and_the_rest_answered(model_dir, demo, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "images" / "red.png")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "images/corrupt.png", "text": "what color ?"}) + "\n"
                 + json.dumps({"question_id": 2, "image": "images/red.png", "text": "what color ?"}) + "\n"
                 + json.dumps({"question_id": 3, "text": "no image here ?"}) + "\n")
    out = tmp_path / "a.jsonl"
    assert eval_main(["--model", str(model_dir), "--questions", str(q), "--answers", str(out), "--quiet",
                      "--max-new-tokens", "2"]) == 0  # --image-folder defaults to the question file's folder
    assert f"{q}:1: cannot read image" in capsys.readouterr().err
    assert [a["question_id"] for a in _answers(out)] == [2, 3]


# --------------------------------------------------------------------------- ScienceQA / MMBench inputs


def test_scienceqa_json_input(model_dir, demo, tmp_path):
    img = _questions(demo.heldout_questions)[0]["image"]
    data = [
        {"id": "sqa1", "image": img, "conversations": [
            {"from": "human", "value": "<image>\nWhich shape is shown?\nA. circle\nB. square"},
            {"from": "gpt", "value": "A"}]},
        {"id": "sqa2", "conversations": [{"from": "human", "value": "Is ice cold?\nA. yes\nB. no"},
                                         {"from": "gpt", "value": "A"}]},
        {"id": "sqa3"},  # malformed: no conversations
    ]
    q = tmp_path / "sqa.json"
    q.write_text(json.dumps(data, indent=1))
    out = tmp_path / "a.jsonl"
    assert eval_main(["--model", str(model_dir), "--questions", str(q), "--image-folder", str(demo.image_folder),
                      "--answers", str(out), "--single-pred-prompt", "--max-new-tokens", "2", "--quiet"]) == 0
    rows = _answers(out)
    suffix = "\nAnswer with the option's letter from the given choices directly."
    assert [a["question_id"] for a in rows] == ["sqa1", "sqa2"]
    assert rows[0]["prompt"] == "<image>\nWhich shape is shown?\nA. circle\nB. square" + suffix
    assert rows[1]["prompt"] == "Is ice cold?\nA. yes\nB. no" + suffix
    m = score("scienceqa", read_answers(str(out)),
              [{"question_id": "sqa1", "answer": "A", "num_choices": 2},
               {"question_id": "sqa2", "answer": "A", "num_choices": 2}])
    assert 0.0 <= m["accuracy"] <= 100.0 and m["n"] == 2


def _b64_png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench_tsv(tmp_path) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [
        ["0", "What color is it?", "nan", "red", "green", "blue", "", "A", "color", "perception", _b64_png("red")],
        ["1", "Which is a fruit?", "Think of food.", "apple", "rock", "car", "shoe", "A", "knowledge",
         "reasoning", _b64_png("green")],
        ["2", "broken row", "too few fields"],
    ]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_mmbench_tsv_all_rounds(model_dir, tmp_path, capsys, monkeypatch):
    tsv = _mmbench_tsv(tmp_path)
    out = tmp_path / "a.jsonl"
    assert eval_main(["--model", str(model_dir), "--questions", str(tsv), "--answers", str(out), "--all-rounds",
                      "--single-pred-prompt", "--max-new-tokens", "2", "--quiet"]) == 0
    assert f"{tsv}:4: expected 11 tab-separated fields" in capsys.readouterr().err
    rows = _answers(out)
    assert [(a["question_id"], a["round_id"]) for a in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert list(rows[0]) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id",
                             "model_id", "metadata"]
    # LLaVA's model_vqa_mmbench: hint\nquestion\nA. ..; options and their letters rotate left each round
    assert rows[0]["prompt"] == "What color is it?\nA. red\nB. green\nC. blue"
    assert rows[1]["prompt"] == "What color is it?\nA. green\nB. blue\nC. red"
    assert rows[1]["options"] == ["green", "blue", "red"] and rows[1]["option_char"] == ["B", "C", "A"]
    assert rows[3]["prompt"] == "Think of food.\nWhich is a fruit?\nA. apple\nB. rock\nC. car\nD. shoe"
    assert rows[6]["option_char"] == ["D", "A", "B", "C"]

    # resume works per (question, round)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:10])
    counter = CountingBatches(monkeypatch)
    assert eval_main(["--model", str(model_dir), "--questions", str(tsv), "--answers", str(out), "--all-rounds",
                      "--single-pred-prompt", "--max-new-tokens", "2", "--quiet"]) == 0
    assert counter.asked == [1, 1, 1]
    assert [(a["question_id"], a["round_id"]) for a in _answers(out)] == [(a["question_id"], a["round_id"]) for a in rows]

    anns = [{"index": 0, "answer": "A", "A": "red", "B": "green", "C": "blue", "category": "color"},
            {"index": 1, "answer": "A", "A": "apple", "B": "rock", "C": "car", "D": "shoe", "category": "knowledge"}]
    m = score("mmbench", read_answers(str(out)), anns)
    assert 0.0 <= m["accuracy"] <= 100.0


def test_mmbench_single_round_and_chunks(model_dir, tmp_path):
    tsv = _mmbench_tsv(tmp_path)
    outs = []
    for i in range(2):
        out = tmp_path / f"c{i}.jsonl"
        assert eval_main(["--model", str(model_dir), "--questions", str(tsv), "--answers", str(out),
                          "--num-chunks", "2", "--chunk-idx", str(i), "--max-new-tokens", "2", "--quiet"]) == 0
        outs.append(_answers(out))
    assert [[(a["question_id"], a["round_id"]) for a in o] for o in outs] == [[(0, 0)], [(1, 0)]]


# --------------------------------------------------------------------------- training-time hook


def test_eval_hook_on_demo_questions(model_dir, tmp_path):
    from mmkit.eval.hook import EvalHook

    run_dir = tmp_path / "run"
    recipe = mmkit.load_recipe(ROOT / "recipes" / "tiny.yaml",
                               ["train.eval_every=5", "plugins.shapes_demo.train_images=0",
                                "plugins.shapes_demo.heldout_images=4",
                                "eval.max_new_tokens=2"])
    hook = EvalHook.from_recipe(recipe, run_dir, limit=10)
    assert hook is not None
    model = mmkit.load(model_dir).train()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("test.mmkit.eval.hook")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    assert hook.maybe_run(model, 3, log) is None and not records  # not an eval step
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    metrics = hook.maybe_run(model, 10, log, stage=recipe.stages[1])
    assert torch.equal(torch.rand(3), expected_next)  # the training RNG stream is untouched
    assert model.training  # back in train mode
    assert metrics["task"] == "shapes" and metrics["n"] == 10 and metrics["step"] == 10
    assert 0.0 <= metrics["accuracy"] <= 100.0 and metrics["n_missing"] == 0
    assert sum(c["n"] for c in metrics["per_category"].values()) == 10
    lines = [r.getMessage() for r in records]
    assert len(lines) == 4
    assert re.match(r"eval stage instruct step 10: shapes accuracy \d+\.\d% on 10 question\(s\)", lines[0])
    key = {a["question_id"]: a["answer"] for a in read_annotations(str(shapes_paths(
        run_dir / "data", recipe.plugins["shapes_demo"]).heldout_answers))}
    qs = _questions(shapes_paths(run_dir / "data", recipe.plugins["shapes_demo"]).heldout_questions)
    for line, q in zip(lines[1:], qs):
        assert line.startswith(f"  Q: {q['text']!r} -> A: ") and line.endswith(f"(gold: {key[q['question_id']]!r})")
    answers = _answers(metrics["answers"])
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in qs[:10]]
    assert json.loads((run_dir / "eval" / "metrics.jsonl").read_text())["accuracy"] == metrics["accuracy"]

    said: list[str] = []
    assert hook.maybe_run(model, 15, said.append)["n"] == 10  # a plain callable works as the log too
    assert said[0].startswith("eval step 15: shapes accuracy")


def test_eval_hook_construction_rules(tmp_path, demo):
    from mmkit.eval.hook import EvalHook

    tiny = ROOT / "recipes" / "tiny.yaml"
    assert EvalHook.from_recipe(mmkit.load_recipe(tiny), tmp_path) is None  # eval_every = 0
    r = mmkit.load_recipe(tiny, ["train.eval_every=2", "data.sources[0].path=" + str(demo.stage2), "plugins={}"])
    assert EvalHook.from_recipe(r, tmp_path) is None  # no eval.questions and no plug-in that supplies them
    r = mmkit.load_recipe(tiny, ["train.eval_every=2", f"eval.questions={demo.heldout_questions}",
                                 f"eval.image_folder={demo.image_folder}"])
    hook = EvalHook.from_recipe(r, tmp_path, limit=3)
    assert hook is not None and hook.limit == 3 and not hook.due(3) and hook.due(4)
    r = mmkit.load_recipe(tiny, ["train.eval_every=2", f"eval.questions={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(FileNotFoundError, match="eval.questions"):
        EvalHook.from_recipe(r, tmp_path)  # a typo is reported when training starts, not at the first eval


def test_eval_hook_takes_questions_from_an_active_plugin(tmp_path, demo):
    from mmkit.eval.hook import EvalHook
    from mmkit.plugin import EvalSource, Plugin
    from mmkit.registry import plugins

    calls = []

    class Quiz(Plugin):
        def eval_source(self, recipe, run_dir, options):
            calls.append((recipe.name, run_dir, options))
            return EvalSource(load=lambda: (str(demo.heldout_questions), str(demo.image_folder),
                                            str(demo.heldout_answers)), task="gqa")

    tiny = ROOT / "recipes" / "tiny.yaml"
    plugins.register("quiz", obj=Quiz())
    try:
        r = mmkit.load_recipe(tiny, ["train.eval_every=2", "plugins={quiz: {}}"])
        hook = EvalHook.from_recipe(r, tmp_path)
        overridden = EvalHook.from_recipe(mmkit.load_recipe(tiny, ["train.eval_every=2", "plugins={quiz: {}}",
                                                                   "eval.task=shapes"]), tmp_path)
    finally:
        plugins.unregister("quiz")
    assert [(n, d) for n, d, _ in calls] == [("tiny-shapes", tmp_path)] * 2
    assert hook.task == "gqa" and overridden.task == "shapes"  # eval.task wins over the plug-in's task
    hook._load()  # the source is read at the first evaluation
    assert len(hook._questions) == 20 and hook.image_folder == str(demo.image_folder)
    assert hook.annotations == str(demo.heldout_answers)


def test_eval_hook_failure_does_not_stop_training(tmp_path, caplog):
    from mmkit.eval.hook import EvalHook

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "hi ?"}) + "\n")
    hook = EvalHook(2, str(q), task="shapes", out_dir=tmp_path / "eval")

    class Proc:
        image_token = "<image>"

        def __call__(self, **kwargs):
            return {}

    class Broken(torch.nn.Module):
        template = "vicuna_v1"
        processor = Proc()

        def generate(self, *a, **k):
            raise RuntimeError("boom")

    broken = Broken()
    with caplog.at_level(logging.ERROR, logger="mmkit.train"):
        out = hook.maybe_run(broken, 2)
    assert out == {"step": 2, "error": "RuntimeError: boom"} and broken.training
    assert "eval at step 2 failed (training continues)" in caplog.text


def test_a_prompt_past_the_context_is_answered_with_a_warning(caplog):
    """Nothing is cut: a question longer than max_position_embeddings (256 for the demo) is answered, and said."""
    import logging

    import torch

    from mmkit.eval.runner import answer_batch, warn_over_context

    model = mmkit.build(ROOT / "recipes" / "tiny.yaml").eval()
    long_q = {"question_id": "long", "text": " ".join(["what color is the circle ?"] * 60)}  # ~360 tokens
    short_q = {"question_id": "short", "text": "what color is the circle ?"}
    with caplog.at_level(logging.WARNING, logger="mmkit.eval"):
        answers = answer_batch(model, [short_q, long_q], None, max_new_tokens=2)
    assert len(answers) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "mmkit.eval"]
    assert len(lines) == 1 and lines[0].startswith("question long: a prompt of ") and \
        "longer than the model's context of 256 (max_position_embeddings); answered anyway, nothing cut" in lines[0]
    assert warn_over_context(model, [short_q], torch.ones(1, 250, dtype=torch.long), 6) == 0
    assert warn_over_context(model, [short_q], torch.ones(1, 251, dtype=torch.long), 6) == 1
