"""The built-in demo around ``recipes/tiny.yaml``: data, blind twin, held-out accuracy, sample chat, plot.

The demo proves the model reads the image: the same recipe trained and tested on blanked
(all-white) images runs beside it in a second process (``demo.blind_twin``), and both
held-out accuracies are printed with the majority-class baseline.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("mmkit.train")


def is_demo(recipe) -> bool:
    return any(s.path.startswith("synthetic:shapes") for s in recipe.data.sources)


def demo_data(recipe, run_dir: Path):
    """The synthetic shapes dataset of a demo recipe (generated once, then reused)."""
    from mmkit.data.dataset import synthetic_paths

    return synthetic_paths(Path(run_dir) / "data", recipe.demo)


def start_blind_twin(recipe_path: str, overrides: list[str], recipe):
    """Start the same recipe on blanked images in a second process (one thread each)."""
    if not recipe.demo.get("blind_twin", True) or recipe.demo.get("blank_images"):
        return None
    out = Path(recipe.train.output_dir) / "blind"
    cmd = [sys.executable, "-m", "mmkit.train", recipe_path, *overrides, "demo.blank_images=true",
           "demo.blind_twin=false", f"train.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    log.info("blind twin: the same recipe on blanked images runs beside this one (log: %s)", out / "stdout.log")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    fh = open(out / "stdout.log", "w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def heldout_accuracy(model, recipe, run_dir: Path) -> dict:
    from mmkit.eval.runner import answer_questions, read_questions
    from mmkit.eval.scorers import read_annotations, score

    paths = demo_data(recipe, run_dir)
    questions = read_questions(paths.heldout_questions)
    model.eval()
    answers = []
    with open(run_dir / "heldout_answers.jsonl", "w") as fh:
        for q, text in answer_questions(model, questions, paths.image_folder, batch_size=64, max_new_tokens=4,
                                        progress=False):
            row = {"question_id": q["question_id"], "prompt": q["text"], "text": text, "model_id": recipe.name,
                   "metadata": {}}
            answers.append(row)
            fh.write(json.dumps(row) + "\n")
    return score("shapes", answers, read_annotations(paths.heldout_answers))


def finish_demo(model, recipe, run_dir: Path, twin) -> None:
    from PIL import Image

    from mmkit.data.synthetic import majority_baseline, render_scene

    metrics = heldout_accuracy(model, recipe, run_dir)
    acc = metrics["accuracy"]
    (run_dir / "heldout_metrics.json").write_text(json.dumps(metrics, indent=1))
    paths = demo_data(recipe, run_dir)
    baseline = 100 * majority_baseline(paths.heldout_answers)
    import numpy as np

    image, scene = render_scene(np.random.default_rng(12345), size=int(recipe.demo.get("image_size", 32)))
    if recipe.demo.get("blank_images"):
        image = Image.new("RGB", image.size, "white")
    image.save(run_dir / "sample.png")
    question = "what color is the " + scene[0]["shape"] + " ?"
    reply, _ = model.chat(image, question, max_new_tokens=4)
    print(f"\nsample chat ({run_dir / 'sample.png'}: {', '.join(o['color'] + ' ' + o['shape'] for o in scene)})")
    print(f"  USER: {question}\n  ASSISTANT: {reply}")
    print(f"\nheld-out accuracy: {acc:.1f}%  (majority-class baseline {baseline:.1f}%)")
    per_cat = metrics.get("per_category", {})
    if per_cat:
        print("  per category: " + ", ".join(f"{k} {v['accuracy']:.0f}%" for k, v in sorted(per_cat.items())))
    if twin is not None:
        log.info("waiting for the blind twin to finish")
        twin.wait()
        blind_path = Path(recipe.train.output_dir) / "blind" / "heldout_metrics.json"
        if twin.returncode == 0 and blind_path.is_file():
            blind = json.loads(blind_path.read_text())["accuracy"]
            print(f"blind twin (same recipe, images blanked): {blind:.1f}%  -> the image is worth "
                  f"{acc - blind:+.1f} points")
        else:
            print(f"blind twin failed (exit {twin.returncode}); see {Path(recipe.train.output_dir) / 'blind'}")
    print(f"loss curve: {run_dir / 'loss.png'}; model: {run_dir / 'final'}")


def plot_losses(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install 'mmkit[plot]'); losses are in metrics.jsonl")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for r in results:
        xs = range(offset + 1, offset + len(r.losses) + 1)
        ax.plot(xs, r.losses, label=r.name, linewidth=1)
        offset += len(r.losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
