"""The demo's plug-in ``shapes_demo`` and its data source ``shapes``.

A recipe switches the demo on with ``plugins: {shapes_demo: {...}}`` (options: :class:`ShapesDemoOptions`).
Then ``python -m mmkit.train``

* starts the *blind twin* (the same recipe on blanked images, in a second process) before training,
* after training, answers the held-out questions, prints a sample chat, the held-out accuracy next to the
  majority-class baseline and the blind twin's accuracy (:mod:`mmkit.demo.report`),
* and ``train.eval_every`` without ``eval.questions`` evaluates on the held-out questions.

The data source ``shapes:ARG`` generates the dataset of :mod:`mmkit.demo.shapes` once (an identical existing copy
is reused) into ``DATA_DIR/shapes`` (``DATA_DIR/shapes_blank`` with ``blank_images``; in training ``DATA_DIR`` is
``RUN_DIR/data``), sized by the recipe's ``plugins.shapes_demo`` options (the defaults without it), and reads
``shapes:stage1`` (captions), ``shapes:stage2`` (conversations) or ``shapes:auto`` (stage 1 under the ``plain``
template, else stage 2).
"""

from __future__ import annotations

from pathlib import Path

from mmkit.demo.options import NAME, SPLITS, ShapesDemoOptions, options_of, resolve_shapes_source, shapes_paths
from mmkit.plugin import EvalSource, Plugin, TrainRun

class ShapesDemo(Plugin):
    options = ShapesDemoOptions

    def on_train_start(self, run: TrainRun, options: ShapesDemoOptions) -> None:
        from mmkit.demo import report  # the report needs the eval stack; loading a recipe imports this module

        run.state[NAME] = report.start_blind_twin(run, options)

    def on_train_end(self, run: TrainRun, options: ShapesDemoOptions) -> None:
        from mmkit.demo import report  # the report needs the eval stack; loading a recipe imports this module

        report.finish(run, options, run.state.get(NAME))

    def eval_source(self, recipe, run_dir: Path, options: ShapesDemoOptions) -> EvalSource:
        def load():
            paths = shapes_paths(Path(run_dir) / "data", options)
            return str(paths.heldout_questions), str(paths.image_folder), str(paths.heldout_answers)

        return EvalSource(load=load, task="shapes")


plugin = ShapesDemo()

__all__ = ["NAME", "SPLITS", "ShapesDemo", "ShapesDemoOptions", "options_of", "plugin", "resolve_shapes_source",
           "shapes_paths"]
