"""Run every benchmark, one after another, and collect their printed tables and JSON.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results]

Each benchmark times mmkit beside a named peer in the same process run and prints the machine it ran
on; this script writes ``OUT/results.json`` (every benchmark's JSON where it has one) and
``OUT/results.txt`` (every printed table). No benchmark asserts a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, arguments, arguments in --quick mode, whether it takes --json)
BENCHMARKS = [
    ("train_step", [], ["--quick", "--repeats", "2"], True),
    ("train_e2e", [], ["--steps", "3", "--warmup", "1", "--rounds", "1", "--global-batch", "8", "--batch", "4"], True),
    ("kernels", [], ["--quick"], True),
    ("preprocess", [], ["--images", "4", "--rounds", "3"], False),
    ("tokenize", [], ["--quick"], True),
    ("generate", [], ["--repeats", "3", "--new-tokens", "16"], False),
    ("serve", [], ["--levels", "1,2", "--requests", "2", "--max-tokens", "4", "--servers", "mmkit"], True),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", action="append", choices=[b[0] for b in BENCHMARKS])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, text, failed = {}, [], []
    for name, full, quick, has_json in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *(quick if args.quick else full)]
        if has_json:
            cmd += ["--json", str(out / f"{name}.json")]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout, end="")
        text.append(f"== {name} ({time.time() - t0:.0f}s): {' '.join(cmd[1:])}\n{proc.stdout}")
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        if has_json and (out / f"{name}.json").is_file():
            results[name] = json.loads((out / f"{name}.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.txt").write_text("\n".join(text))
    print(f"wrote {out / 'results.json'} and {out / 'results.txt'}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
