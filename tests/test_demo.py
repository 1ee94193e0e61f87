"""The demo (mmkit.demo): its generated shapes data, its word-level tokenizer, its registrations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkit.data.tokenizer import VICUNA_V1_SYSTEM, build_word_tokenizer
from mmkit.demo import shapes as S
from mmkit.demo.tokenizer import shapes_tokenizer

N_TRAIN, N_HELDOUT, SIZE, SEED = 300, 200, 32, 7


def _load_json(p):
    return json.loads(Path(p).read_text())


def _jsonl(p):
    return [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return S.write_dataset(root / "d", N_TRAIN, N_HELDOUT, SIZE, SEED)


@pytest.fixture(scope="module")
def blind(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_blind")
    return S.write_dataset(root / "d", N_TRAIN, N_HELDOUT, SIZE, SEED, blank_images=True)


@pytest.fixture(scope="module")
def tok():
    return shapes_tokenizer()


@pytest.fixture(scope="module")
def scenes(data):
    return {r["id"]: r for r in _jsonl(data.scenes)}


# ------------------------------------------------------------------------------------------ independent oracle


def oracle(scene: list[dict], question: str) -> tuple[str, str]:
    """(category, answer) recomputed from the scene by parsing the question text."""
    q = question.removeprefix("<image>\n")
    if m := re.fullmatch(r"what color is the (\w+) \?", q):
        (hit,) = [o for o in scene if o["shape"] == m[1]]
        return "color", hit["color"]
    if m := re.fullmatch(r"what shape is the (\w+) one \?", q):
        (hit,) = [o for o in scene if o["color"] == m[1]]
        return "shape", hit["shape"]
    if q == "how many shapes ?":
        return "count", ["one", "two", "three"][len(scene) - 1]
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", q):
        assert m[1] in S.COLORS and m[2] in S.SHAPES
        return "exists", "yes" if {"color": m[1], "shape": m[2]} in [
            {"color": o["color"], "shape": o["shape"]} for o in scene
        ] else "no"
    if m := re.fullmatch(r"where is the (\w+) shape \?", q):
        (hit,) = [o for o in scene if o["color"] == m[1]]
        return "where", hit["slot"]
    raise AssertionError(f"unexpected question {question!r}")


def components(img: Image.Image) -> list[np.ndarray]:
    """4-connected components of clearly non-white pixels: list of (k, 3) RGB arrays."""
    a = np.asarray(img.convert("RGB")).astype(int)
    fg = (255 - a).max(-1) > 60
    seen = np.zeros_like(fg)
    out = []
    h, w = fg.shape
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        stack, pix = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pix.append(a[cy, cx])
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append((np.array(pix), (y, x)))
    return out


def nearest_color(rgb) -> str:
    return min(S.COLORS, key=lambda c: float(np.sum((np.array(S.COLORS[c]) - rgb) ** 2)))


# ------------------------------------------------------------------------------------------ generator


def test_render_deterministic_and_seed_dependent():
    for size in (32, 64):
        a = [S.render_scene(np.random.default_rng(3), size) for _ in range(2)]
        assert a[0][1] == a[1][1]
        assert a[0][0].tobytes() == a[1][0].tobytes()
        assert a[0][0].size == (size, size) and a[0][0].mode == "RGB"
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(2)
    first = [S.render_scene(rng1)[0].tobytes() for _ in range(5)]
    assert first != [S.render_scene(rng2)[0].tobytes() for _ in range(5)]


def test_scene_structure_and_image_matches_scene():
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(300):
        img, scene = S.render_scene(rng, 32)
        assert 1 <= len(scene) <= 3
        assert all(set(o) == {"shape", "color", "slot"} for o in scene)
        for key in ("shape", "color", "slot"):
            assert len({o[key] for o in scene}) == len(scene)  # distinct shapes, colours, slots
        assert [o["slot"] for o in scene] == sorted((o["slot"] for o in scene), key=S.SLOTS.index)
        counts[len(scene)] += 1
        a = np.asarray(img)
        assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()
        # one separate blob per object, with the object's colour, in the object's slot
        comps = components(img)
        assert len(comps) == len(scene), scene
        for obj in scene:
            fx, fy = S.SLOT_CENTERS[obj["slot"]]
            cy, cx = int(fy * 32), int(fx * 32)
            assert nearest_color(a[cy, cx].astype(int)) == obj["color"], (obj, a[cy, cx])
        for pix, _ in comps:
            solid = pix[(255 - pix).max(-1) > 120]
            assert nearest_color(np.median(solid, 0)) in {o["color"] for o in scene}
        empty = set(S.SLOTS) - {o["slot"] for o in scene}
        for slot in empty:
            fx, fy = S.SLOT_CENTERS[slot]
            assert (a[int(fy * 32), int(fx * 32)] == 255).all()
    assert min(counts.values()) > 70  # 1, 2 and 3 objects all common


def test_captions_match_scenes(data, scenes):
    for rec in _load_json(data.stage1):
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n")
        scene = scenes[rec["id"]]["scene"]
        parts = conv[1]["value"].split(" , ")
        assert len(parts) == len(scene)
        for part, obj in zip(parts, scene):
            assert part == f"a {obj['color']} {obj['shape']} at {obj['slot']}"


def test_random_caption_order_changes_only_the_order(data, tmp_path):
    other = S.write_dataset(tmp_path / "random", N_TRAIN, N_HELDOUT, SIZE, SEED, caption_order="random")
    slot, rand = _load_json(data.stage1), _load_json(other.stage1)
    assert [r["id"] for r in slot] == [r["id"] for r in rand]
    moved = 0
    for a, b in zip(slot, rand):
        pa, pb = a["conversations"][1]["value"].split(" , "), b["conversations"][1]["value"].split(" , ")
        assert sorted(pa) == sorted(pb)  # the same objects, each with its own colour, shape and slot
        moved += pa != pb
    assert moved > N_TRAIN // 4  # most scenes have 2-3 objects: many orders differ
    # images, conversations and held-out questions are those of the slot-order data
    assert _load_json(data.stage2) == _load_json(other.stage2)
    assert Path(data.heldout_answers).read_text() == Path(other.heldout_answers).read_text()
    assert (Path(data.image_folder) / "images/train_000003.png").read_bytes() == \
        (Path(other.image_folder) / "images/train_000003.png").read_bytes()
    with pytest.raises(ValueError, match="caption_order: expected one of slot, random, mixed, any, mixed_any, got 'sorted'"):
        S.write_dataset(tmp_path / "bad", 5, 5, caption_order="sorted")


def test_any_caption_order_names_each_attribute_in_every_order(data, tmp_path):
    other = S.write_dataset(tmp_path / "any", N_TRAIN, N_HELDOUT, SIZE, SEED, caption_order="any")
    kind = {**{c: "C" for c in S.COLOR_NAMES}, **{s: "S" for s in S.SHAPES}, **{p: "P" for p in S.SLOTS}}
    orders = set()
    for a, b in zip(_load_json(data.stage1), _load_json(other.stage1)):
        def objects(text):
            return sorted(tuple(sorted(w for w in phrase.split() if w in kind)) for phrase in text.split(" , "))

        slot_caption, any_caption = a["conversations"][1]["value"], b["conversations"][1]["value"]
        assert objects(slot_caption) == objects(any_caption)  # the same objects, each with its own attributes
        assert set(any_caption.split()) <= set(S.vocabulary())
        orders |= {"".join(kind[w] for w in phrase.split() if w in kind) for phrase in any_caption.split(" , ")}
    assert orders == {"CSP", "CPS", "SCP", "SPC", "PCS", "PSC"}
    assert _load_json(data.stage2) == _load_json(other.stage2)


def test_every_answer_is_correct_for_its_scene(data, scenes):
    stage2 = _load_json(data.stage2)
    assert len(stage2) == N_TRAIN
    firsts = Counter()
    for rec in stage2:
        conv = rec["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * 5
        assert sorted(t["category"] for t in conv[::2]) == sorted(S.CATEGORIES)  # all types in one conversation
        firsts[conv[0]["category"]] += 1
        scene = scenes[rec["id"]]["scene"]
        for q, a in zip(conv[::2], conv[1::2]):
            assert len(a["value"].split()) == 1
            assert oracle(scene, q["value"]) == (q["category"], a["value"]) == (a["category"], a["value"])
    assert set(firsts) == set(S.CATEGORIES)  # turn order is shuffled

    qs, key = _jsonl(data.heldout_questions), _jsonl(data.heldout_answers)
    assert len(qs) == len(key) == 5 * N_HELDOUT
    assert len({q["question_id"] for q in qs}) == len(qs)
    by_image = {r["image"]: r["scene"] for r in scenes.values() if r["split"] == "heldout"}
    train_images = {r["image"] for r in scenes.values() if r["split"] == "train"}
    for q, k in zip(qs, key):
        assert q["question_id"] == k["question_id"] and q["category"] == k["category"]
        assert "<image>" not in q["text"] and q["image"] not in train_images
        assert (data.image_folder / q["image"]).is_file()
        assert oracle(by_image[q["image"]], q["text"]) == (k["category"], k["answer"])


def test_existence_answers_balanced(data):
    answers = [
        t["value"]
        for rec in _load_json(data.stage2)
        for t in rec["conversations"]
        if t["from"] == "gpt" and t["category"] == "exists"
    ]
    answers += [k["answer"] for k in _jsonl(data.heldout_answers) if k["category"] == "exists"]
    assert set(answers) == {"yes", "no"}
    assert 0.45 <= answers.count("yes") / len(answers) <= 0.55


def test_write_dataset_deterministic_and_idempotent(data, tmp_path):
    other = S.write_dataset(tmp_path / "again", N_TRAIN, N_HELDOUT, SIZE, SEED)
    for name in ("stage1", "stage2", "heldout_questions", "heldout_answers", "scenes"):
        assert Path(other[name]).read_bytes() == Path(data[name]).read_bytes(), name
    for name in (f"train_{0:06d}.png", f"train_{N_TRAIN - 1:06d}.png", f"heldout_{0:06d}.png"):
        assert (other.root / "images" / name).read_bytes() == (data.root / "images" / name).read_bytes()

    mtime = other.manifest.stat().st_mtime_ns
    assert S.write_dataset(tmp_path / "again", N_TRAIN, N_HELDOUT, SIZE, SEED) == other
    assert other.manifest.stat().st_mtime_ns == mtime  # reused, not rewritten

    changed = S.write_dataset(tmp_path / "again", 20, 10, SIZE, SEED + 1)  # other parameters: regenerated
    assert len(_load_json(changed.stage2)) == 20 and len(list((changed.root / "images").iterdir())) == 30
    assert _load_json(changed.manifest)["params"]["seed"] == SEED + 1

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        S.write_dataset(tmp_path / "foreign", 5, 5)
    assert (tmp_path / "foreign" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_blank_images_are_blank(blind, data):
    files = sorted((blind.root / "images").iterdir())
    assert len(files) == N_TRAIN + N_HELDOUT
    for f in files:
        with Image.open(f) as im:
            assert im.size == (SIZE, SIZE)
            assert (np.asarray(im.convert("RGB")) == 255).all()
    for name in ("stage1", "stage2", "heldout_questions", "heldout_answers"):  # the same text as the seeing twin
        assert Path(blind[name]).read_bytes() == Path(data[name]).read_bytes()
    assert _load_json(blind.manifest)["params"]["blank_images"] is True
    with Image.open(data.root / "images/train_000000.png") as im:
        assert (np.asarray(im) != 255).any()


def test_majority_baseline(data):
    base = S.majority_baseline(data.heldout_answers)
    assert 0.2 <= base <= 0.6
    per = S.majority_baseline_by_category(data.heldout_answers)
    assert set(per) == set(S.CATEGORIES)
    assert per["color"] < 0.3 and per["where"] < 0.4 and 0.4 <= per["exists"] <= 0.65
    assert base == pytest.approx(sum(per.values()) / 5)  # five questions per image


# ------------------------------------------------------------------------------------------ tokenizer


def _demo_texts(data):
    texts = []
    for rec in _load_json(data.stage1) + _load_json(data.stage2):
        texts += [t["value"] for t in rec["conversations"]]
    texts += [q["text"] for q in _jsonl(data.heldout_questions)]
    texts += [k["answer"] for k in _jsonl(data.heldout_answers)]
    return texts


def vicuna_v1(conv: list[dict]) -> str:
    out = VICUNA_V1_SYSTEM + " "
    for t in conv:
        out += ("USER: " + t["value"] + " ") if t["from"] == "human" else ("ASSISTANT: " + t["value"] + "</s>")
    return out


def test_tokenizer_round_trips_demo_text(data, tok):
    texts = set(_demo_texts(data))
    assert any(t.startswith("<image>\n") for t in texts)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
        with_bos = tok(text)["input_ids"]
        assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids and with_bos.count(tok.bos_token_id) == 1
        if "<image>" not in text:
            assert tok.decode(with_bos, skip_special_tokens=True) == text
    # whitespace is normalised; words and punctuation split
    assert tok.decode(tok("  a red\tcircle   at top ,a\r blue ", add_special_tokens=False)["input_ids"]) == (
        "a red circle at top , a blue"
    )
    assert tok.convert_ids_to_tokens(tok("top,left?", add_special_tokens=False)["input_ids"]) == [
        "top", ",", "left", "?"
    ]


def test_tokenizer_special_tokens_and_templates(data, tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert tok.image_token == "<image>" and tok.image_token_id == 4
    assert tok("<image>")["input_ids"] == [1, 4]  # LLaVA masks exactly these two positions in stage 1
    assert tok("</s>", add_special_tokens=False)["input_ids"] == [2]

    rec = _load_json(data.stage2)[0]
    prompt = vicuna_v1(rec["conversations"])
    ids = tok(prompt)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert tok.unk_token_id not in ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.image_token_id) == 1 and ids.count(tok.eos_token_id) == 5
    i = toks.index("<image>")
    assert toks[i - 2 : i + 2] == ["USER", ":", "<image>", "\n"]
    # each answer is one word followed directly by </s>, then the next "USER :"
    for j, t in enumerate(toks):
        if t == "</s>":
            assert toks[j - 3 : j - 1] == ["ASSISTANT", ":"]
            assert j == len(toks) - 1 or toks[j + 1 : j + 3] == ["USER", ":"]
    # generation prompt of the vicuna template and the short-answer suffix
    suffix = "\nAnswer the question using a single word or phrase."
    gen = tok(VICUNA_V1_SYSTEM + " USER: <image>\nhow many shapes ?" + suffix + " ASSISTANT:")
    assert tok.unk_token_id not in gen["input_ids"]

    # plain (stage 1): "<image>" + caption + "\n"
    cap = _load_json(data.stage1)[0]["conversations"][1]["value"]
    plain = tok("<image>" + cap + "\n")["input_ids"]
    assert plain[:2] == [1, 4] and tok.convert_ids_to_tokens(plain[-1]) == "\n"
    assert tok.unk_token_id not in plain and len(plain) == 2 + len(cap.split()) + 1
    assert tok.decode(plain, skip_special_tokens=True) == cap + "\n"

    assert tok("is there a pink cube ?", add_special_tokens=False)["input_ids"].count(tok.unk_token_id) == 2


def test_tokenizer_ids_deterministic():
    a, b = shapes_tokenizer(), shapes_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    words = ["b a", "c , d", "a"]
    t1, t2 = build_word_tokenizer(words, template_words=False), build_word_tokenizer(words[::-1], template_words=False)
    assert t1.get_vocab() == t2.get_vocab() == {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4, "\n": 5, ",": 6, "a": 7, "b": 8, "c": 9, "d": 10
    }
    assert set(S.vocabulary()) <= set(a.get_vocab())
    assert len(a) < 100


def test_tokenizer_save_load_round_trip(tmp_path, tok, data):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path / "tok")
    texts = [vicuna_v1(r["conversations"]) for r in _load_json(data.stage2)[:20]]
    texts += ["<image>" + r["conversations"][1]["value"] + "\n" for r in _load_json(data.stage1)[:20]]
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = cls.from_pretrained(tmp_path / "tok", local_files_only=True)
        assert loaded.get_vocab() == tok.get_vocab()
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (1, 2, 3, 0)
        assert loaded.convert_tokens_to_ids("<image>") == 4 and "<image>" in loaded.all_special_tokens
        assert loaded.padding_side == "right"
        for text in texts:
            ids = loaded(text)["input_ids"]
            assert ids == tok(text)["input_ids"]
            assert loaded.decode(ids) == tok.decode(ids)
        batch = loaded([texts[0], "<image>a red circle at top\n"], padding=True)
        short = batch["input_ids"][1]
        assert len(short) == len(batch["input_ids"][0]) and short[8:] == [3] * (len(short) - 8)  # right padding
        assert batch["attention_mask"][1] == [1] * 8 + [0] * (len(short) - 8)


# ------------------------------------------------------------------------------------------ the demo as a plug-in

ROOT = Path(__file__).resolve().parents[1]


def test_demo_registers_through_entry_points():
    import importlib.metadata

    from mmkit.demo import plugin as P
    from mmkit.demo.scorer import score_shapes
    from mmkit.registry import data_sources, plugins, scorers, tokenizers

    wanted = {"mmkit.plugins": ("shapes_demo", "mmkit.demo.plugin:plugin"),
              "mmkit.data_sources": ("shapes", "mmkit.demo.plugin:resolve_shapes_source"),
              "mmkit.tokenizers": ("shapes", "mmkit.demo.tokenizer:shapes_tokenizer"),
              "mmkit.scorers": ("shapes", "mmkit.demo.scorer:score_shapes")}
    for group, (name, value) in wanted.items():
        eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
        assert eps.get(name) == value, f"{group}: {eps} (reinstall: pip install -e .)"
    assert plugins.get("shapes_demo") is P.plugin and P.plugin.options is P.ShapesDemoOptions
    assert data_sources.get("shapes") is P.resolve_shapes_source
    assert tokenizers.get("shapes") is shapes_tokenizer
    assert scorers.get("shapes") is score_shapes


def test_demo_options_defaults():
    from mmkit.demo.plugin import ShapesDemoOptions, options_of

    assert options_of(None) == options_of({}) == ShapesDemoOptions(4000, 200, 32, 0, False, True)
    assert options_of({"shapes_demo": {"train_images": 5}}).train_images == 5


def test_builtin_tokenizer_name_comes_from_the_registry():
    import mmkit
    from mmkit.recipe import RecipeError

    model = mmkit.build(ROOT / "recipes" / "tiny.yaml")
    assert model.tokenizer.get_vocab() == shapes_tokenizer().get_vocab()
    with pytest.raises(RecipeError, match=r"model.llm.tokenizer: unknown tokenizer 'shapez'; did you mean 'shapes'\?"):
        mmkit.build(ROOT / "recipes" / "tiny.yaml", ["model.llm.tokenizer=builtin:shapez"])


def test_blind_twin_command_is_the_same_recipe_on_blank_images(tmp_path, monkeypatch):
    import os
    import subprocess

    import torch

    import mmkit
    from mmkit.demo import report
    from mmkit.plugin import TrainRun

    class Proc:
        pid = 4242

    started, pinned, threads = [], {}, []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)) or Proc())
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.__setitem__(pid, list(cpus)), raising=False)
    overrides = ["stages[0].max_steps=5", f"train.output_dir={tmp_path}"]
    recipe = mmkit.load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
    run = TrainRun(recipe=recipe, run_dir=tmp_path, recipe_path=str(ROOT / "recipes" / "tiny.yaml"),
                   overrides=overrides)
    opts = recipe.plugins["shapes_demo"]
    assert isinstance(report.start_blind_twin(run, opts), Proc)
    (cmd, kw), = started
    assert cmd[1:4] == ["-m", "mmkit.train", run.recipe_path] and kw["env"]["OMP_NUM_THREADS"] == "1"
    # the two runs split the CPUs, so each one's default data.num_workers counts only its own half
    assert pinned == {Proc.pid: [1], 0: [0]} and threads == [1]
    twin = mmkit.load_recipe(cmd[3], cmd[4:])  # the twin's command line is a valid recipe
    t = twin.plugins["shapes_demo"]
    assert t.blank_images and not t.blind_twin and twin.train.output_dir == str(tmp_path / "blind")
    assert twin.stages[0].max_steps == 5
    assert report.start_blind_twin(TrainRun(recipe=twin, run_dir=tmp_path, recipe_path=cmd[3]), t) is None
    run.world_size = 2
    assert report.start_blind_twin(run, opts) is None and len(started) == 1  # no twin beside a multi-process run
    run.world_size = 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    report.start_blind_twin(run, opts)
    assert started[-1][1]["env"]["OMP_NUM_THREADS"] == "2" and pinned == {Proc.pid: [3, 4], 0: [0, 1, 2]}
    assert threads[-1] == 3


def test_no_demo_special_case_outside_the_demo_package():
    found = []
    for path in sorted((ROOT / "mmkit").rglob("*.py")):
        if (ROOT / "mmkit" / "demo") in path.parents:
            continue
        text = path.read_text()
        for needle in ("is_demo", "synthetic:", "from mmkit.demo", "import mmkit.demo"):
            if needle in text:
                found.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not found, found


def test_a_killed_generation_leaves_nothing_behind_next_time(tmp_path):
    from mmkit.demo.shapes import write_dataset

    root = tmp_path / "shapes"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".shapes.tmp-{int(dead.stdout)}-123"  # what a killed generator leaves
    (stale / "images").mkdir(parents=True)
    live = tmp_path / f".shapes.tmp-{os.getpid()}-456"  # a generator still running is left alone
    live.mkdir()
    write_dataset(root, n_train_images=4, n_heldout=2, image_size=32, seed=0)
    assert not stale.exists() and live.exists() and (root / "manifest.json").is_file()


def test_before_dpo_figures_skip_a_sharded_checkpoint(tmp_path, caplog):
    import mmkit
    from mmkit.demo import report

    recipe = mmkit.load_recipe(ROOT / "recipes" / "tiny_dpo.yaml", [f"train.output_dir={tmp_path}"])
    (tmp_path / "checkpoints" / "stage1-step00000010" / "dcp").mkdir(parents=True)  # what train.strategy fsdp saves
    with caplog.at_level("WARNING", logger="mmkit.train"):
        assert report.before_dpo(None, recipe, tmp_path, recipe.plugins["shapes_demo"]) is None
    assert "holds no model.safetensors (a sharded checkpoint): no before-DPO figures" in caplog.text
