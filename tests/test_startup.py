"""Start-up cost: ``import mmkit`` and every command's ``--help`` answer without loading torch & co.

Each check runs in a fresh interpreter (``sys.modules`` of this pytest process is full of torch) and
looks at which heavy packages ended up imported. No timing: the imports are what makes --help slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "fastapi", "gradio", "uvicorn", "numpy")
MARKER = "@@startup@@ "

# How `python -m MODULE` runs (runpy, as -m does) or how a console script runs (import, then main() with
# sys.argv), then what was imported: the help text is stdout up to the marker line.
WRAPPER = f"""
import importlib, json, runpy, sys
mode, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
code = "returned"
try:
    if mode == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "script":
        module, _, func = target.partition(":")
        code = getattr(importlib.import_module(module), func)()
    else:
        importlib.import_module(target)
except SystemExit as exc:
    code = exc.code
print({MARKER!r} + json.dumps({{"exit": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""

# module -> what its --help must mention (its main arguments)
COMMANDS = {
    "mmkit.train": ("recipe", "overrides", "--resume", "--dry-run"),
    "mmkit.chat": ("--model", "--image", "--query", "--max-new-tokens", "--load-4bit", "/reset"),
    "mmkit.serve": ("--model", "--host", "--port", "--api-key", "--max-image-bytes", "--ui"),
    "mmkit.eval": ("--model", "--questions", "--answers", "--image-folder", "--batch-size", "--num-chunks"),
    "mmkit.eval.score": ("--task", "--answers", "--annotations", "--output", "--strict"),
    "mmkit.convert": ("src", "dst", "--to", "--dtype"),
}
# console script -> the module whose `python -m` form it mirrors
SCRIPTS = {
    "mmkit-train": "mmkit.train", "mmkit-chat": "mmkit.chat", "mmkit-serve": "mmkit.serve",
    "mmkit-eval": "mmkit.eval", "mmkit-score": "mmkit.eval.score", "mmkit-convert": "mmkit.convert",
}


def _run(mode: str, target: str) -> tuple[str, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", WRAPPER, mode, target], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{mode} {target}: exit {proc.returncode}\n{proc.stderr}"
    help_text, sep, result = proc.stdout.rpartition(MARKER)
    assert sep, f"{mode} {target}: the wrapper printed no result\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return help_text, json.loads(result)


def _console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_import_mmkit_is_light():
    _, res = _run("import", "mmkit")
    assert res["heavy"] == [], f"import mmkit imported {res['heavy']}"


@pytest.mark.parametrize("module", list(COMMANDS))
def test_python_m_help_is_light(module):
    help_text, res = _run("module", module)
    assert res["exit"] == 0, f"python -m {module} --help exited {res['exit']!r}"
    assert res["heavy"] == [], f"python -m {module} --help imported {res['heavy']}"
    assert help_text.startswith("usage:"), help_text
    missing = [arg for arg in COMMANDS[module] if arg not in help_text]
    assert not missing, f"python -m {module} --help does not mention {missing}:\n{help_text}"


def test_console_scripts_are_declared():
    scripts = _console_scripts()
    assert set(SCRIPTS) <= set(scripts), f"missing from [project.scripts]: {sorted(set(SCRIPTS) - set(scripts))}"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_console_script_entry_help_is_light(script):
    entry = _console_scripts()[script]
    help_text, res = _run("script", entry)
    assert res["exit"] == 0, f"{script} ({entry}) --help exited {res['exit']!r}"
    assert res["heavy"] == [], f"{script} ({entry}) --help imported {res['heavy']}"
    missing = [arg for arg in COMMANDS[SCRIPTS[script]] if arg not in help_text]
    assert not missing, f"{script} --help does not mention {missing}"


def test_installed_console_script_runs():
    """The generated wrapper in the interpreter's bin/ (present once mmkit is pip-installed)."""
    exe = Path(sys.executable).parent / ("mmkit-chat.exe" if os.name == "nt" else "mmkit-chat")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--query" in proc.stdout
