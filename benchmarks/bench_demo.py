"""The built-in demo, whole, as a user runs it: the landed version against this checkout, one after the other.

    python benchmarks/bench_demo.py [--landed /work/landed] [--seeds 0] [--only new|landed] [--json OUT]

Each side runs ``python -m mmkit.train recipes/tiny.yaml train.seed=S train.output_dir=TMP`` in a fresh output
directory (data generation, both stages, the blind twin beside it in a second process, held-out evaluation,
sample chat: everything the README's first command does after installing). ``landed`` imports mmkit from
``--landed`` (a checkout of the version before the training-throughput work, e.g. ``git worktree add
/work/landed 1f71bdc``) with that checkout's own ``recipes/tiny.yaml``; ``new`` is this checkout. Reported per run:
wall time, each stage's training time (from the run log), held-out accuracy, per-category accuracy and the
blind twin's accuracy as printed by the demo, and the ratio new / landed of the wall times measured in this
run. Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_demo(side: str, src: Path, seed: int, out: Path) -> dict:
    """One demo run of checkout ``src``; its wall time and what it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "kernels")])}
    cmd = [sys.executable, "-m", "mmkit.train", "recipes/tiny.yaml", f"train.seed={seed}",
           f"train.output_dir={out}"]
    origin = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('mmkit').origin)"],
                            cwd=src, env=env, capture_output=True, text=True, check=False).stdout.strip()
    print(f"{side}: mmkit from {origin}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    (out / "bench_stdout.log").write_text(text)
    found = {
        "heldout": re.search(r"held-out accuracy: ([\d.]+)%", text),
        "baseline": re.search(r"majority-class baseline ([\d.]+)%", text),
        "blind": re.search(r"blind twin \(same recipe, images blanked\): ([\d.]+)%", text),
        "per_category": re.search(r"per category: (.*)", text),
    }
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage \d '(\w+)' done: \d+ steps in ([\d.]+)s", text)}
    return {"side": side, "seed": seed, "mmkit": origin, "exit": proc.returncode, "wall_s": round(wall, 1), "stage_s": stages,
            **{k: (float(v.group(1)) if k != "per_category" else v.group(1).strip()) if v else None
               for k, v in found.items()},
            "log": str(out / "bench_stdout.log")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--landed", default="/work/landed", help="checkout of the landed mmkit (commit 1f71bdc)")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values, e.g. 0,1,2")
    ap.add_argument("--only", choices=["new", "landed"], help="run one side only")
    ap.add_argument("--keep", help="keep the run directories under this folder (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    sides = [("landed", Path(args.landed).resolve()), ("new", ROOT)]
    if args.only:
        sides = [s for s in sides if s[0] == args.only]
    if any(name == "landed" for name, _ in sides) and not (Path(args.landed) / "mmkit").is_dir():
        ap.error(f"--landed {args.landed}: no mmkit checkout there (git worktree add {args.landed} 1f71bdc)")
    machine = machine_info()  # printed on one line, the CPU's vector instruction set included
    base = Path(args.keep or tempfile.mkdtemp(prefix="bench_demo_"))
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, src in sides:
            out = base / f"{name}_seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            r = run_demo(name, src, seed, out)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'side':<7} {'seed':>4} {'wall':>8} {'stages (s)':<28} {'held-out':>8} {'blind':>6} {'majority':>8}")
    for r in results:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_s"].items())
        print(f"{r['side']:<7} {r['seed']:>4} {r['wall_s']:>7.0f}s {stages:<28} {r['heldout'] or float('nan'):>7.1f}% "
              f"{r['blind'] or float('nan'):>5.1f}% {r['baseline'] or float('nan'):>7.1f}%")
    for seed in sorted({r["seed"] for r in results}):
        pair = {r["side"]: r for r in results if r["seed"] == seed}
        if len(pair) == 2:
            print(f"seed {seed}: new / landed wall time = {pair['new']['wall_s'] / pair['landed']['wall_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
