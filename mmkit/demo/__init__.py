"""mmkit's offline demo (``python -m mmkit.train recipes/tiny.yaml``), packaged as a plug-in.

It plugs in the way a third-party package would, through entry points in mmkit's pyproject.toml:

========================  ===============  =============================================================
group                     name             object
========================  ===============  =============================================================
``mmkit.plugins``         ``shapes_demo``  :data:`mmkit.demo.plugin.plugin`: blind twin, held-out
                                           accuracy, sample chat, training-time eval questions
``mmkit.data_sources``    ``shapes``       :func:`mmkit.demo.plugin.resolve_shapes_source`:
                                           ``path: shapes:auto|stage1|stage2``
``mmkit.tokenizers``      ``shapes``       :func:`mmkit.demo.tokenizer.shapes_tokenizer`:
                                           ``model.llm.tokenizer: builtin:shapes``
``mmkit.scorers``         ``shapes``       :func:`mmkit.demo.scorer.score_shapes`: ``--task shapes``
========================  ===============  =============================================================

Modules: :mod:`~mmkit.demo.shapes` (the generated data), :mod:`~mmkit.demo.tokenizer`,
:mod:`~mmkit.demo.scorer`, :mod:`~mmkit.demo.report` (what the demo prints) and
:mod:`~mmkit.demo.plugin` (options and hooks).
"""
