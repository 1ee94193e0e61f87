"""Where a decode step of ``mmkit.infer.engine`` spends its time: the bench_serve model, N concurrent requests.

    python benchmarks/profile_engine.py [--batch 16] [--tokens 32] [--threads 1] [--cprofile | --torch-profile]
                                        [--no-prefix-cache]

Writes bench_serve's random llava-hf model, loads it with ``mmkit.load``, submits ``--batch`` requests (one
image + a question each, 4 distinct prompts) to one Engine at once, twice (the first run warms up), and
reports for the second: wall time, the time of each scheduler phase (admission, prefill and decode passes,
sampling + detokenizing), the decode steps and the time per step; ``--cprofile`` adds cProfile's table of
the scheduler thread, ``--torch-profile`` torch.profiler's operators (self CPU time). With prefix reuse on,
the second run copies its prompts' keys/values from the first run's slots.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forward-threads", type=int, default=1)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false")
    args = ap.parse_args(argv)

    import torch  # heavy: after the arguments
    from bench_serve import write_model
    from common import machine_info
    from PIL import Image

    import mmkit
    from mmkit.infer.chat import build_chat_inputs
    from mmkit.infer.engine import Engine

    torch.set_num_threads(args.threads)
    machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="prof-engine-"))
    write_model(tmp / "m")
    model = mmkit.load(tmp / "m").eval()
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    qs = ["what color is the shape ?", "describe the image .", "where is the shape in the picture ?",
          "what is in the picture ? answer in detail ."]
    inputs = []
    for k in range(args.batch):
        img = Image.new("RGB", (96 + 8 * (k % 4), 80), colors[k % 4])
        inputs.append(build_chat_inputs(model, [{"role": "user", "content": "<image>\n" + qs[k % 4]}], [img],
                                        system=""))
    print(f"prompt tokens: {inputs[0]['input_ids'].shape[-1]}")
    eng = Engine(model, max_batch_size=args.batch, max_batch_tokens=512, forward_threads=args.forward_threads,
                 prefix_cache=args.prefix_cache)
    eng.generate(**inputs[0], max_new_tokens=4, ignore_eos=True)  # warm

    def run():
        steps0 = eng.steps_total
        t0 = time.perf_counter()
        reqs = [eng.submit(**x, max_new_tokens=args.tokens, ignore_eos=True) for x in inputs]
        for r in reqs:
            r.wait()
        wall = time.perf_counter() - t0
        return wall, eng.steps_total - steps0, sum(len(r.token_ids) for r in reqs)

    run()
    # the passes run in the engine's scheduler thread: time its phases there (and profile them when asked)
    phases: dict[str, float] = {}
    orig_run_job, orig_admit, orig_accept = eng._run_job, eng._admit, eng._accept

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    eng._run_job = lambda job: timed("forward " + job[0], orig_run_job)(job)
    eng._admit = timed("admit (images + embed)", orig_admit)
    eng._accept = timed("accept (sample + detokenize + stops)", orig_accept)
    orig_step = eng._step
    if args.cprofile:
        import cProfile  # optional: only when asked

        prof = cProfile.Profile()

        def step():  # cProfile of the scheduler thread's steps
            prof.enable()
            try:
                return timed("step", orig_step)()
            finally:
                prof.disable()
    elif args.torch_profile:
        from torch.profiler import (  # optional: only when asked
            ProfilerActivity,
            profile,
        )

        def step():  # torch.profiler around each step, in the scheduler thread (its overhead inflates times)
            with profile(activities=[ProfilerActivity.CPU]) as p:
                out = timed("step", orig_step)()
            step.tables.append(p.key_averages())
            return out
        step.tables = []
    else:
        def step():
            return timed("step", orig_step)()
    eng._step = step
    wall, steps, toks = run()
    for name, t in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {t * 1e3:8.1f} ms  {t / wall * 100:5.1f}% of wall")
    if args.cprofile:
        import pstats  # optional: only when asked

        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    if args.torch_profile:
        agg: dict[str, float] = {}
        for table in step.tables:
            for e in table:
                agg[e.key] = agg.get(e.key, 0.0) + e.self_cpu_time_total
        total = sum(agg.values())
        for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:30]:
            print(f"  {k:40s} {v / 1e3:8.1f} ms  {v / total * 100:5.1f}%")
    print(f"engine: {args.batch} requests x {args.tokens} tokens: {wall:.2f} s, {toks / wall:.1f} tok/s, "
          f"{steps} decode steps, {wall / max(1, steps) * 1e3:.1f} ms per step (incl. prefill)")
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
