"""The demo's options (``plugins.shapes_demo``) and its data source ``shapes:ARG`` (see :mod:`mmkit.demo.plugin`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmkit.demo.shapes import ShapesDatasetPaths, write_dataset, write_dpo_pairs

NAME = "shapes_demo"  # the plug-in's entry-point name in pyproject.toml: its key under the recipe's plugins:
# shapes:ARG -> file (None: by template); dpo: preference pairs derived from the stage-2 file (write_dpo_pairs)
SPLITS = {"auto": None, "stage1": "stage1", "stage2": "stage2", "dpo": "dpo"}


@dataclass
class ShapesDemoOptions:
    """``plugins.shapes_demo`` in a recipe."""

    train_images: int = 4000  # training images (stage-1 captions and stage-2 conversations of the same images)
    heldout_images: int = 200  # fresh held-out images, one question of each of the five kinds per image
    image_size: int = 32
    seed: int = 0  # the data's seed (train.seed seeds the training)
    blank_images: bool = False  # every image plain white: what the blind twin trains and is tested on
    blind_twin: bool = True  # train the blind twin beside this run (single-process runs only)
    caption_order: str = "slot"  # stage-1 captions: objects in slot order, "random", "mixed" (1/2 each) or "any" (see shapes.caption)


def options_of(plugins: Mapping[str, Any] | None) -> ShapesDemoOptions:
    """The demo's options in a recipe's ``plugins:`` mapping (the defaults when it has none)."""
    opts = (plugins or {}).get(NAME)
    if opts is None:
        return ShapesDemoOptions()
    return ShapesDemoOptions(**opts) if isinstance(opts, Mapping) else opts


def shapes_paths(data_dir: str | os.PathLike, options: ShapesDemoOptions | None = None) -> ShapesDatasetPaths:
    """Generate (or reuse) the demo data under ``data_dir``; its files (stage1, stage2, heldout_questions, ...)."""
    o = options or ShapesDemoOptions()
    sub = "shapes_blank" if o.blank_images else "shapes"
    return write_dataset(Path(data_dir) / sub, n_train_images=int(o.train_images), n_heldout=int(o.heldout_images),
                         image_size=int(o.image_size), seed=int(o.seed), blank_images=bool(o.blank_images),
                         caption_order=str(o.caption_order))


def resolve_shapes_source(arg: str, ctx) -> tuple[str, str]:
    """The data source ``shapes:auto|stage1|stage2|dpo`` (``ctx``: :class:`mmkit.data.dataset.SourceContext`)."""
    if arg not in SPLITS:
        raise ValueError(f"shapes:{arg}: unknown split {arg!r}; choices: {', '.join('shapes:' + s for s in SPLITS)}")
    if ctx.data_dir is None:
        raise ValueError(f"shapes:{arg}: needs a data_dir to generate the demo data into (e.g. RUN_DIR/data)")
    paths = shapes_paths(ctx.data_dir, options_of(ctx.plugins))
    if arg == "dpo":
        return str(write_dpo_pairs(paths)), str(paths.image_folder)
    split = SPLITS[arg] or ("stage1" if ctx.template == "plain" else "stage2")
    return str(paths[split]), str(paths.image_folder)
