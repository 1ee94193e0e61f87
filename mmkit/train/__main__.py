"""python -m mmkit.train RECIPE.yaml [key=value ...] [--resume] [--dry-run]

The recipe's active plug-ins (``plugins:``, see :mod:`mmkit.plugin`) get ``on_train_start`` before
the first step and ``on_train_end`` after the final model is saved, both in the main process only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from mmkit.plugin import TrainRun
from mmkit.registry import plugins

EPILOG = """
examples:
  python -m mmkit.train recipes/tiny.yaml                      # the offline demo
  python -m mmkit.train recipes/llava15.yaml --dry-run         # print the plan, train nothing
  python -m mmkit.train recipes/llava15.yaml recipes/overlays/tiny_parts.yaml --dry-run   # offline: tiny parts
  python -m mmkit.train recipes/tiny.yaml stages[1].max_steps=100 train.output_dir=runs/quick
  python -m mmkit.train recipes/tiny.yaml --resume             # continue from the latest checkpoint
  torchrun --nproc_per_node 2 -m mmkit.train recipes/tiny.yaml train.strategy=ddp
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmkit.train", description="Train a recipe's stages in order.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (YAML values), e.g. train.bf16=true, "
                   "or overlay recipe files deep-merged in order, e.g. recipes/overlays/tiny_parts.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parts, steps, memory) and exit")
    p.add_argument("--resume-changed", metavar="KEYS", default="",
                   help="with --resume: comma-separated key paths (or prefixes, e.g. stages[1].lr) that may differ "
                        "from the checkpoint's recipe; the run's recipe.yaml then records the new values")
    p.add_argument("--debug", action="store_true", help="on an error, show the whole traceback instead of one line")
    return p.parse_intermixed_args(argv)


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_hooks(hook: str, run: TrainRun) -> None:
    """Call ``hook`` (``on_train_start`` | ``on_train_end``) of each plug-in in ``run.recipe.plugins``, in order."""
    for name, options in run.recipe.plugins.items():
        fn = getattr(plugins.get(name), hook, None)
        if fn is not None:
            fn(run, options)


def _log_traceback(run_dir: Path, exc: BaseException) -> None:
    """The whole traceback goes to RUN/train.log for whoever debugs; the terminal gets one line."""
    log_file = run_dir / "train.log"
    if log_file.parent.is_dir():
        with open(log_file, "a") as fh:
            traceback.print_exception(exc, file=fh)


def _allowed(change: str, allowed: tuple[str, ...]) -> bool:
    key = change.split(": ", 1)[0]
    return any(key == a or key.startswith(a + ".") or key.startswith(a + "[") for a in allowed)


def resume_changes(recipe, ckpt_root: Path, log) -> list[str]:
    """What the recipe changes against the checkpoint --resume would continue from (nothing: an empty list)."""
    # after parsing, as every import of this command: --help loads nothing (checkpoint imports torch)
    from mmkit.recipe import load_recipe, recipe_changes
    from mmkit.train.checkpoint import resumable_checkpoint

    ckpt = resumable_checkpoint(ckpt_root, log)
    if ckpt is None:
        return []
    return recipe_changes(load_recipe(ckpt / "recipe.yaml"), recipe, ignore=("train.output_dir",))


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmkit.recipe import RecipeError, load_recipe  # after parsing: --help loads nothing

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not recipe.stages:
        print(f"error: {args.recipe}: stages: the recipe has no stages, so there is nothing to train", file=sys.stderr)
        return 2

    from mmkit.train import distributed as dist_utils  # heavy (torch): once the recipe is known to be good

    ctx = dist_utils.init_from_env()
    run_dir = Path(recipe.train.output_dir)
    setup_logging(None if args.dry_run else run_dir, ctx.is_main)
    log = logging.getLogger("mmkit.train")

    # heavy (torch, transformers): once the recipe is known to be good
    import torch

    import mmkit
    from mmkit.hub import HubUnavailableError
    from mmkit_kernels import kernel_mode, set_kernel_mode

    torch.manual_seed(recipe.train.seed)
    set_kernel_mode(os.environ.get("MMKIT_KERNELS") or recipe.model.kernels)
    try:
        model = mmkit.build(recipe)
    except (RecipeError, HubUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recipe = model.recipe  # resolved
    if args.resume and not args.dry_run:
        allowed = tuple(k.strip() for k in args.resume_changed.split(",") if k.strip())
        changed = resume_changes(recipe, run_dir / "checkpoints", log)
        accepted = [c for c in changed if _allowed(c, allowed)]
        changed = [c for c in changed if c not in accepted]
        if accepted:
            log.warning("--resume with a changed recipe (--resume-changed): %s", "; ".join(accepted))
        if changed:
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            print(f"error: --resume: the recipe differs from the one {run_dir / 'checkpoints'} was trained with "
                  f"({shown}); resume with the same recipe, allow the change with --resume-changed KEYS, or start "
                  "a new run in another train.output_dir", file=sys.stderr)
            return 2

    if args.dry_run:
        from mmkit.train.loop import dry_run  # heavy, as above

        print(dry_run(model, recipe))
        return 0

    summary = model.summary()
    log.info("model: %s", ", ".join(f"{k} {v['params']:,} params" for k, v in summary.items()))
    log.info("kernels: MMKIT_KERNELS=%s (auto = Triton on CUDA, torch elsewhere)", kernel_mode())
    log.info("image preprocessing: %s backend", recipe.model.image.backend)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe.save(run_dir / "recipe.yaml")

    run = TrainRun(recipe=recipe, run_dir=run_dir, recipe_path=args.recipe, overrides=list(args.overrides),
                   world_size=ctx.world_size, model=model)
    if ctx.is_main:
        run_hooks("on_train_start", run)

    from mmkit.train.loop import Trainer  # heavy, as above

    t0 = time.time()
    try:
        results = Trainer(model, recipe, run_dir, resume=args.resume).run()
    except (ValueError, OSError) as exc:  # mmkit's own checks (data, recipe, checkpoints, disk): one line
        if args.debug:
            raise
        _log_traceback(run_dir, exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2  # no shutdown barrier: the other ranks may never reach it; torchrun stops them
    state_dict = dist_utils.full_state_dict(model, ctx) if recipe.train.strategy == "fsdp" else None
    if ctx.is_main:
        # heavy, as above
        from mmkit.formats.native import save_mmkit
        from mmkit.train.lora import has_lora, merge_lora, save_adapter

        saved = model
        if has_lora(model) and getattr(model, "_mmkit_fsdp", False):
            # peft saves and merges from whole weights, and a sharded model has only its shard here: an unsharded
            # twin with the same adapters takes the gathered weights
            from mmkit.train.stages import apply_lora  # heavy (peft), as above

            saved = mmkit.build(recipe)
            apply_lora(saved, next(s for s in recipe.stages if s.trainable.llm in ("lora", "qlora")))
            saved.load_state_dict(state_dict)
            state_dict = None
        if has_lora(saved):
            log.info("saved the LoRA adapter to %s; merging it into the final model",
                     save_adapter(saved, run_dir / "adapter"))
            merge_lora(saved)
            state_dict = None  # the merged model's own weights (a state dict taken before held the adapters)
        final = save_mmkit(saved, run_dir / "final", state_dict=state_dict, overwrite=True)  # the run's own
        log.info("saved the trained model to %s (%.0fs of training)", final, time.time() - t0)
        from mmkit.train.plot import plot_losses  # heavy, as above

        plot_losses(results, run_dir / "loss.png")
        if recipe.plugins:
            # a sharded model cannot run on one rank alone: the plug-ins get the saved copy
            run.model = mmkit.load(final) if getattr(model, "_mmkit_fsdp", False) else saved
            run.results, run.final_dir = results, final
            run_hooks("on_train_end", run)
    dist_utils.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
