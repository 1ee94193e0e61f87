"""The demo's procedural dataset (data source ``shapes:auto|stage1|stage2|dpo``, see :mod:`mmkit.demo.plugin`).

Small white images with one to three coloured shapes (circle, square, triangle), each in a distinct one of four
slots (top, left, right, bottom), plus:

* stage-1 captions in LLaVA JSON ("a red circle at top , a blue square at left"),
* stage-2 multi-turn conversations: all five question types of one image in one conversation (colour of a named
  shape, shape of a named colour, count, existence, position), one-word answers,
* a held-out split of fresh images as a LLaVA question file plus an answer key,
* optionally a "blind twin" whose images are all blank (same text), to show that a model really reads the image.

All text is lower-case words with punctuation as separate words, so a word-level tokenizer
(:func:`mmkit.demo.tokenizer.shapes_tokenizer`) covers it exactly. Everything is deterministic given the seed.

Files written by :func:`write_dataset` (image paths are relative to ``out_dir``, i.e. use ``out_dir`` as the
LLaVA ``--image_folder``)::

    out_dir/images/train_000000.png ...         training images (stage 1 and stage 2 use the same images)
    out_dir/images/heldout_000000.png ...       held-out images (fresh draws from an independent stream)
    out_dir/stage1.json                         [{"id", "image", "conversations": [human "<image>\\n...", gpt caption]}]
    out_dir/stage2.json                         [{"id", "image", "conversations": [human, gpt, human, gpt, ...]}]
                                                each turn also carries "category" (ignored by LLaVA loaders)
    out_dir/heldout_questions.jsonl             {"question_id", "image", "text", "category"}   (no "<image>" in text)
    out_dir/heldout_answers_key.jsonl           {"question_id", "answer", "category"}
    out_dir/scenes.jsonl                        {"id", "split", "image", "scene"} ground truth of every image
    out_dir/manifest.json                       parameters + counts; written last, used for reuse
    out_dir/dpo.json                            [{"id", "image", "question", "chosen", "rejected"}] (shapes:dpo only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

# The name recorded in manifest.json (and so part of the reuse check): kept from when the data source was
# called `synthetic:shapes`, so copies generated before are reused, not regenerated.
DATASET_NAME = "synthetic:shapes"
GENERATOR_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Six well-separated base colours (pairwise RGB distance >= ~115 before jitter).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 45),
    "blue": (35, 70, 215),
    "yellow": (230, 200, 25),
    "purple": (145, 50, 185),
    "cyan": (25, 185, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SLOTS: tuple[str, ...] = ("top", "left", "right", "bottom")  # also the canonical (reading) order of a scene
# Slot centres as fractions of the image size (x, y).
SLOT_CENTERS: dict[str, tuple[float, float]] = {
    "top": (0.5, 0.17),
    "left": (0.17, 0.5),
    "right": (0.83, 0.5),
    "bottom": (0.5, 0.83),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "exists", "where")

# Geometry, as fractions of the image size. A shape of half-size h is drawn in the box centre +- h (circle:
# inscribed circle; square: the box; triangle: apex at the top middle, base along the bottom). With these numbers
# any two shapes in different slots are separated even in the worst case of size and position jitter (the
# diagonal gap between neighbouring slots exceeds the two circumradii sqrt(2)*h), and every shape stays inside
# the image.
HALF_SIZE = 0.12
SIZE_JITTER = 0.05  # relative: h *= U(1 - j, 1 + j)
POS_JITTER = 0.03  # absolute: centre += U(-j, j) * size per axis
COLOR_JITTER = 20  # per channel, +- this many levels
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact colour in the interior

STAGE1_PROMPT = "describe the image ."
QUESTION_TEMPLATES: dict[str, str] = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} one ?",
    "count": "how many shapes ?",
    "exists": "is there a {color} {shape} ?",
    "where": "where is the {color} shape ?",
}
EXISTS_HARD_NEGATIVE_P = 0.75  # a "no" question shares its colour or shape with an object in the image


# --------------------------------------------------------------------------------------------- scenes and images


def sample_scene(rng: np.random.Generator) -> list[dict[str, str]]:
    """A random scene: 1-3 objects with distinct shapes, distinct colours and distinct slots, in slot order."""
    n = int(rng.integers(1, 4))
    slots = rng.choice(len(SLOTS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colors = rng.choice(len(COLOR_NAMES), size=n, replace=False)
    objs = sorted(zip(slots.tolist(), shapes.tolist(), colors.tolist()))
    return [{"shape": SHAPES[sh], "color": COLOR_NAMES[c], "slot": SLOTS[sl]} for sl, sh, c in objs]


def draw_scene(rng: np.random.Generator, scene: list[dict[str, str]], size: int = 32) -> Image.Image:
    """Render ``scene`` (jitter drawn from ``rng``) as an RGB image of ``size`` x ``size`` on white."""
    if size < 16:
        raise ValueError(f"image size must be >= 16, got {size}")
    n = len(scene)
    jit = rng.uniform(-1.0, 1.0, size=(n, 3))  # size, dx, dy
    cjit = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=(n, 3))
    s = SUPERSAMPLE
    big = size * s
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj, (js, jx, jy), cj in zip(scene, jit, cjit):
        fx, fy = SLOT_CENTERS[obj["slot"]]
        h = HALF_SIZE * (1.0 + SIZE_JITTER * js) * big
        cx = (fx + POS_JITTER * jx) * big
        cy = (fy + POS_JITTER * jy) * big
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[obj["color"]]) + cj, 0, 255))
        box = [cx - h, cy - h, cx + h - 1, cy + h - 1]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - h), (cx + h - 1, cy + h - 1), (cx - h, cy + h - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}")
    return img.reduce(s) if s > 1 else img


def render_scene(rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, list[dict[str, str]]]:
    """Draw a random scene and render it: ``(PIL RGB image, [{"shape", "color", "slot"}, ...])``.

    Deterministic given the state of the numpy Generator ``rng``; the scene is in slot order
    (top, left, right, bottom).
    """
    scene = sample_scene(rng)
    return draw_scene(rng, scene, size), scene


def blank_image(size: int) -> Image.Image:
    """The blind twin's image: plain white."""
    return Image.new("RGB", (size, size), (255, 255, 255))


# --------------------------------------------------------------------------------------------- text


CAPTION_ORDERS = ("slot", "random", "mixed", "any", "mixed_any")
# ``any``: each object in one of the six orders of its colour (C), shape (S) and slot (P), so that every attribute
# is predicted from every other one somewhere in stage 1 (the questions of stage 2 look objects up by colour and by
# shape); the words are all in the questions' vocabulary.
_PHRASES = (
    "a {c} {s} at {p}",  # C S P
    "the {c} one at {p} is a {s}",  # C P S
    "the {s} is {c} at {p}",  # S C P
    "the {s} at {p} is {c}",  # S P C
    "at {p} a {c} {s}",  # P C S
    "at {p} the {s} is {c}",  # P S C
)


def caption(scene: list[dict[str, str]], rng: np.random.Generator | None = None, order: str = "slot") -> str:
    """Stage-1 caption: "a red circle at top , a blue square at left". ``order``: the objects in slot order;
    ``random``: in an order drawn from ``rng`` (then the shape after a colour and the slot after "at" must be
    found from what was named, not from the place in the sentence); ``mixed``: one or the other, 1/2 each
    (``mixed_any``: slot or any, 1/2 each);
    ``any``: a random object order and, per object, one of six phrasings that name its colour, shape and slot in
    each possible order ("the circle at top is red", "at left a blue square", ...)."""
    if order in ("mixed", "mixed_any"):
        order = ("random" if order == "mixed" else "any") if rng.random() < 0.5 else "slot"
    objs = scene if order == "slot" else [scene[i] for i in rng.permutation(len(scene))]
    if order == "any":
        forms = rng.integers(len(_PHRASES), size=len(objs))
        return " , ".join(_PHRASES[f].format(c=o["color"], s=o["shape"], p=o["slot"]) for f, o in zip(forms, objs))
    return " , ".join(f"a {o['color']} {o['shape']} at {o['slot']}" for o in objs)


def answer(scene: list[dict[str, str]], category: str, **slots: str) -> str:
    """The one-word answer of question ``category`` (with template fields ``slots``) for ``scene``."""
    if category == "color":
        return next(o["color"] for o in scene if o["shape"] == slots["shape"])
    if category == "shape":
        return next(o["shape"] for o in scene if o["color"] == slots["color"])
    if category == "count":
        return COUNT_WORDS[len(scene)]
    if category == "exists":
        return "yes" if any(o["color"] == slots["color"] and o["shape"] == slots["shape"] for o in scene) else "no"
    if category == "where":
        return next(o["slot"] for o in scene if o["color"] == slots["color"])
    raise ValueError(f"unknown question category {category!r}")


def _exists_query(rng: np.random.Generator, scene: list[dict[str, str]]) -> dict[str, str]:
    if rng.random() < 0.5:
        o = scene[int(rng.integers(len(scene)))]
        return {"color": o["color"], "shape": o["shape"]}
    present = {(o["color"], o["shape"]) for o in scene}
    colors = {o["color"] for o in scene}
    shapes = {o["shape"] for o in scene}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    hard = [(c, s) for c, s in absent if c in colors or s in shapes]
    pool = hard if hard and rng.random() < EXISTS_HARD_NEGATIVE_P else absent
    c, s = pool[int(rng.integers(len(pool)))]
    return {"color": c, "shape": s}


def questions(rng: np.random.Generator, scene: list[dict[str, str]], shuffle: bool = True) -> list[dict[str, str]]:
    """One question of each category about ``scene``: ``[{"category", "question", "answer"}, ...]``.

    Questions only name objects that are present (except the "no" existence questions); a "yes"/"no" existence
    question is drawn with probability 1/2 each. ``shuffle`` randomises the order (so that every category also
    appears as the first turn, which is what a single-question evaluation sees).
    """
    out = []
    for cat in CATEGORIES:
        if cat == "color":
            fields_ = {"shape": scene[int(rng.integers(len(scene)))]["shape"]}
        elif cat in ("shape", "where"):
            fields_ = {"color": scene[int(rng.integers(len(scene)))]["color"]}
        elif cat == "exists":
            fields_ = _exists_query(rng, scene)
        else:
            fields_ = {}
        out.append(
            {
                "category": cat,
                "question": QUESTION_TEMPLATES[cat].format(**fields_),
                "answer": answer(scene, cat, **fields_),
            }
        )
    if shuffle:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def conversation(qas: list[dict[str, str]]) -> list[dict[str, str]]:
    """LLaVA conversation turns for a list of question/answers; the first human turn starts with "<image>\\n"."""
    turns = []
    for i, qa in enumerate(qas):
        q = ("<image>\n" if i == 0 else "") + qa["question"]
        turns.append({"from": "human", "value": q, "category": qa["category"]})
        turns.append({"from": "gpt", "value": qa["answer"], "category": qa["category"]})
    return turns


def make_sample(rng: np.random.Generator, size: int = 32, blank: bool = False) -> dict[str, Any]:
    """One in-memory sample: ``{"image", "scene", "caption", "qas", "conversation"}``."""
    img, scene = render_scene(rng, size)
    qas = questions(rng, scene)
    return {
        "image": blank_image(size) if blank else img,
        "scene": scene,
        "caption": caption(scene),
        "qas": qas,
        "conversation": conversation(qas),
    }


def vocabulary() -> list[str]:
    """Every word the generator can emit (captions, prompts, questions, answers), sorted."""
    words = set(STAGE1_PROMPT.split()) | set(COUNT_WORDS[1:]) | {"yes", "no", "a", "at", ","}
    words |= set(SHAPES) | set(COLOR_NAMES) | set(SLOTS)
    for t in QUESTION_TEMPLATES.values():
        words |= {w for w in t.split() if not w.startswith("{")}
    return sorted(words)


# --------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ShapesDatasetPaths:
    """Where :func:`write_dataset` put things. ``image_folder`` is the root the "image" fields are relative to."""

    root: Path
    image_folder: Path
    stage1: Path
    stage2: Path
    heldout_questions: Path
    heldout_answers: Path
    scenes: Path
    manifest: Path

    def __getitem__(self, key: str) -> Path:
        return getattr(self, key)

    def to_dict(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def _paths(root: Path) -> ShapesDatasetPaths:
    return ShapesDatasetPaths(
        root=root,
        image_folder=root,
        stage1=root / "stage1.json",
        stage2=root / "stage2.json",
        heldout_questions=root / "heldout_questions.jsonl",
        heldout_answers=root / "heldout_answers_key.jsonl",
        scenes=root / "scenes.jsonl",
        manifest=root / "manifest.json",
    )


def _params(n_train_images: int, n_heldout: int, image_size: int, seed: int, blank_images: bool,
            caption_order: str = "slot") -> dict[str, Any]:
    return {
        "caption_order": caption_order,
        "dataset": DATASET_NAME,
        "generator_version": GENERATOR_VERSION,
        "n_train_images": int(n_train_images),
        "n_heldout": int(n_heldout),
        "image_size": int(image_size),
        "seed": int(seed),
        "blank_images": bool(blank_images),
    }


def _existing(paths: ShapesDatasetPaths, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    required = [paths.stage1, paths.stage2, paths.heldout_questions, paths.heldout_answers, paths.scenes]
    return all(p.is_file() for p in required) and (paths.root / "images").is_dir()


def _split_stream(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), {"train": 0, "heldout": 1}[split]])


def _generate_split(
    rng: np.random.Generator, n: int, split: str, size: int, blank: bool, img_dir: Path
) -> Iterator[tuple[str, str, list[dict[str, str]], list[dict[str, str]]]]:
    """Yield ``(id, image_rel_path, scene, qas)`` and write each image as PNG."""
    white = blank_image(size) if blank else None
    for i in range(n):
        img, scene = render_scene(rng, size)
        qas = questions(rng, scene)
        name = f"{split}_{i:06d}.png"
        (white if blank else img).save(img_dir / name, compress_level=1)
        yield f"shapes_{split}_{i:06d}", f"images/{name}", scene, qas


def _signature(scene: list[dict[str, str]]) -> tuple:
    return tuple((o["slot"], o["shape"], o["color"]) for o in scene)


def _remove_abandoned(root: Path) -> None:
    """Temporary copies left by a generator that was killed (its pid, in the name, is gone)."""
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_dataset(
    out_dir: str | os.PathLike,
    n_train_images: int = 4000,
    n_heldout: int = 200,
    image_size: int = 32,
    seed: int = 0,
    blank_images: bool = False,
    caption_order: str = "slot",
) -> ShapesDatasetPaths:
    """Generate the shapes dataset into ``out_dir`` (see the module docstring for the files).

    ``n_heldout`` is a number of held-out *images*; each gets one question per category (5 questions).
    ``blank_images=True`` writes the blind twin: identical text, every image plain white.
    Idempotent: if ``out_dir/manifest.json`` records the same parameters the existing files are reused. Otherwise
    the dataset is built in a temporary sibling directory and moved into place (replacing an older generated
    dataset, never a directory that does not hold one).
    """
    root = Path(out_dir)
    paths = _paths(root)
    if caption_order not in CAPTION_ORDERS:
        raise ValueError(f"caption_order: expected one of {', '.join(CAPTION_ORDERS)}, got {caption_order!r}")
    params = _params(n_train_images, n_heldout, image_size, seed, blank_images, caption_order)
    # a stream of its own, so the images and questions are the same for either order
    order_rng = np.random.default_rng([int(seed), 2])
    if _existing(paths, params):
        return paths
    if n_train_images < 0 or n_heldout < 0:
        raise ValueError("n_train_images and n_heldout must be >= 0")
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        if any(root.iterdir()) and not paths.manifest.is_file():
            raise FileExistsError(f"{root} is not empty and holds no generated shapes dataset; refusing to overwrite")

    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp_paths = _paths(tmp)
    img_dir = tmp / "images"
    img_dir.mkdir(parents=True)
    try:
        stage1, stage2, scenes = [], [], []
        train_sigs = set()
        for sid, rel, scene, qas in _generate_split(
            _split_stream(seed, "train"), n_train_images, "train", image_size, blank_images, img_dir
        ):
            stage1.append(
                {
                    "id": sid,
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + STAGE1_PROMPT},
                        {"from": "gpt", "value": caption(scene, order_rng, caption_order)},
                    ],
                }
            )
            stage2.append({"id": sid, "image": rel, "conversations": conversation(qas)})
            scenes.append({"id": sid, "split": "train", "image": rel, "scene": scene})
            train_sigs.add(_signature(scene))

        questions_lines, answer_lines = [], []
        overlap = 0
        for sid, rel, scene, qas in _generate_split(
            _split_stream(seed, "heldout"), n_heldout, "heldout", image_size, blank_images, img_dir
        ):
            scenes.append({"id": sid, "split": "heldout", "image": rel, "scene": scene})
            overlap += _signature(scene) in train_sigs
            for qa in qas:
                qid = f"{sid}_{qa['category']}"
                questions_lines.append(
                    {"question_id": qid, "image": rel, "text": qa["question"], "category": qa["category"]}
                )
                answer_lines.append({"question_id": qid, "answer": qa["answer"], "category": qa["category"]})

        tmp_paths.stage1.write_text(json.dumps(stage1))
        tmp_paths.stage2.write_text(json.dumps(stage2))
        _write_jsonl(tmp_paths.heldout_questions, questions_lines)
        _write_jsonl(tmp_paths.heldout_answers, answer_lines)
        _write_jsonl(tmp_paths.scenes, scenes)
        manifest = {
            "params": params,
            "counts": {
                "train_images": n_train_images,
                "stage1_samples": len(stage1),
                "stage2_samples": len(stage2),
                "stage2_answers": sum(len(s["conversations"]) // 2 for s in stage2),
                "heldout_images": n_heldout,
                "heldout_questions": len(questions_lines),
            },
            # Fraction of held-out images whose discrete layout (slot, shape, colour of each object) also occurs
            # in training (with different jitter): there are only ~4k distinct layouts.
            "heldout_layout_seen_in_train": overlap / n_heldout if n_heldout else 0.0,
            "image_folder": ".",
            "seconds": round(time.perf_counter() - t0, 3),
        }
        tmp_paths.manifest.write_text(json.dumps(manifest, indent=1))

        if root.exists():
            if _existing(paths, params):  # a concurrent writer finished first
                shutil.rmtree(tmp)
                return paths
            shutil.rmtree(root)  # empty, or an older generated dataset (checked above)
        try:
            os.replace(tmp, root)
        except OSError:
            if _existing(paths, params):  # lost a race to an identical writer
                shutil.rmtree(tmp, ignore_errors=True)
                return paths
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_dpo_pairs(paths: ShapesDatasetPaths) -> Path:
    """Preference pairs for a DPO stage, derived from the stage-2 conversations of the training images (the other
    files are not touched): ``ROOT/dpo.json`` (written once, atomically), records ``{"id", "image", "question",
    "chosen", "rejected"}`` (the RLAIF-V layout). Per image: its "exists" question, chosen = the true answer,
    rejected = the other one (so an absent object's hallucinated "yes" is the rejected answer), and its "color"
    question, rejected = a colour the image does not show there (drawn from a stream of its own)."""
    out = paths.root / "dpo.json"
    if out.is_file():
        return out
    rng = np.random.default_rng([int(json.loads(paths.manifest.read_text())["params"]["seed"]), 3])
    rows = []
    for rec in json.loads(paths.stage2.read_text()):
        turns = rec["conversations"]
        for q, a in zip(turns[0::2], turns[1::2]):
            question = q["value"].replace("<image>\n", "")
            if q.get("category") == "exists":
                rejected = "no" if a["value"] == "yes" else "yes"
            elif q.get("category") == "color":
                others = [c for c in COLOR_NAMES if c != a["value"]]
                rejected = others[int(rng.integers(len(others)))]
            else:
                continue
            rows.append({"id": f"{rec['id']}_{q['category']}", "image": rec["image"], "question": question,
                         "chosen": a["value"], "rejected": rejected})
    tmp = out.with_name(f".dpo.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, out)
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------- baselines


def majority_baseline_by_category(answer_key_path: str | os.PathLike) -> dict[str, float]:
    """Per category: the accuracy of always giving that category's most frequent answer."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for row in read_jsonl(answer_key_path):
        answers[row["category"]][row["answer"]] += 1
    return {cat: c.most_common(1)[0][1] / sum(c.values()) for cat, c in sorted(answers.items())}


def majority_baseline(answer_key_path: str | os.PathLike) -> float:
    """Overall accuracy of a blind model that answers each category's majority answer (what text alone reaches).

    The majorities are taken on the key itself, so this is a slight upper bound for a blind model.
    """
    answers: dict[str, Counter] = defaultdict(Counter)
    for row in read_jsonl(answer_key_path):
        answers[row["category"]][row["answer"]] += 1
    total = sum(sum(c.values()) for c in answers.values())
    if total == 0:
        raise ValueError(f"{answer_key_path} holds no answers")
    return sum(c.most_common(1)[0][1] for c in answers.values()) / total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mmkit.demo.shapes", description="Generate the demo's shapes dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--n-train-images", type=int, default=4000)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blank-images", action="store_true")
    a = ap.parse_args(argv)
    p = write_dataset(a.out_dir, a.n_train_images, a.n_heldout, a.image_size, a.seed, a.blank_images)
    print(json.dumps({**p.to_dict(), "majority_baseline": majority_baseline(p.heldout_answers)}, indent=1))


if __name__ == "__main__":
    main()
