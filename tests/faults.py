"""Fault injection for the crash / resume tests, from the test side: a subprocess entry point that arms a
fault and then runs the real CLI ``main``.

    python -m tests.faults train --kill-at 1:2 -- RECIPE.yaml key=value ...   # dies after stage 1, step 2
    python -m tests.faults train --kill-in-save 2 -- RECIPE.yaml ...          # dies inside the 2nd checkpoint write
    python -m tests.faults eval --crash-after 8 -- --model ... --answers ...  # dies writing answer line 9

Every fault is ``os._exit(137)``: no cleanup, no ``finally``, no flush of Python buffers, as after a SIGKILL.
Run it from the repository root (or with the root on PYTHONPATH) so that ``tests`` is importable.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

KILLED = 137


def kill_at_step(stage: int, step: int) -> None:
    """Every Trainer gets a callback that kills the process after optimizer step ``step`` of stage ``stage``
    (after that step's metrics and periodic checkpoint)."""
    from mmkit.train.loop import Trainer

    real_init = Trainer.__init__

    @functools.wraps(real_init)
    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.callbacks.append(lambda s, t: os._exit(KILLED) if (s, t) == (stage, step) else None)

    Trainer.__init__ = init


def kill_in_save(nth: int) -> None:
    """Kill the process inside the ``nth`` checkpoint write: ``save_checkpoint`` calls ``rng_state_plain``
    inside its ``atomic_dir`` block, after the weights and optimizer state are in the temporary directory."""
    from mmkit.train import checkpoint

    real = checkpoint.rng_state_plain
    calls = 0

    @functools.wraps(real)
    def rng_state_plain():
        nonlocal calls
        calls += 1
        if calls == nth:
            os._exit(KILLED)
        return real()

    checkpoint.rng_state_plain = rng_state_plain


def crash_eval_after(n: int) -> None:
    """Kill ``python -m mmkit.eval`` once at least ``n`` answers are fsynced, in the middle of writing the next
    line. ``answer_to_file`` fsyncs after every batch, so at the next ``answer_batch`` call (or when it
    returns) everything answered so far is on disk; a torn line is then appended and the process dies."""
    from mmkit.eval import runner

    real_to_file, real_batch = runner.answer_to_file, runner.answer_batch
    answers_path, answered = None, 0

    def die():
        with open(answers_path, "a", encoding="utf-8") as fh:
            fh.write('{"question_id": "half-written')
            fh.flush()
        os._exit(KILLED)

    @functools.wraps(real_batch)
    def answer_batch(*args, **kwargs):
        nonlocal answered
        if answered >= n:
            die()
        texts = real_batch(*args, **kwargs)
        answered += len(texts)
        return texts

    @functools.wraps(real_to_file)
    def answer_to_file(model, questions, path, *args, **kwargs):
        nonlocal answers_path
        answers_path = path
        stats = real_to_file(model, questions, path, *args, **kwargs)
        if answered >= n:
            die()
        return stats

    runner.answer_batch, runner.answer_to_file = answer_batch, answer_to_file


def _stage_step(text: str) -> tuple[int, int]:
    stage, sep, step = text.partition(":")
    if not sep or not stage.isdigit() or not step.isdigit():
        raise argparse.ArgumentTypeError(f"expected STAGE:STEP (e.g. 1:2), got {text!r}")
    return int(stage), int(step)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: python -m tests.faults {train,eval} [FAULT OPTIONS] -- CLI ARGUMENTS")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m tests.faults")
    sub = p.add_subparsers(dest="cli", required=True)
    train = sub.add_parser("train", help="python -m mmkit.train")
    train.add_argument("--kill-at", type=_stage_step, metavar="STAGE:STEP")
    train.add_argument("--kill-in-save", type=int, metavar="N")
    ev = sub.add_parser("eval", help="python -m mmkit.eval")
    ev.add_argument("--crash-after", type=int, required=True, metavar="N")
    args = p.parse_args(argv[:cut])
    if args.cli == "train":
        if args.kill_at:
            kill_at_step(*args.kill_at)
        if args.kill_in_save:
            kill_in_save(args.kill_in_save)
        from mmkit.train.__main__ import main as cli_main
    else:
        crash_eval_after(args.crash_after)
        from mmkit.eval.__main__ import main as cli_main
    return cli_main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
