"""Tests never touch the network: the hub is offline for the whole session.

And mmkit never calls a deprecated API: pyproject's ``filterwarnings`` turns the Future- and
DeprecationWarnings *attributed* to an mmkit module into errors, but a library may attribute its
warning elsewhere -- transformers' ``deprecate_kwarg`` warns with ``stacklevel=2``, which lands in
torch's ``Module._call_impl`` when the deprecated argument came through ``module(...)``, and
``gradient_checkpointing_enable`` warns from inside transformers. The fixture below looks at the
stack instead: it fails a test when the first frame above the library that warned (past the frames
that only pass a call on) is mmkit's. Warnings in subprocesses and in fixtures wider than a test
are not seen.
"""

import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

_OURS = ("mmkit", "mmkit_kernels")
_WARNINGS = ("warnings", "_py_warnings")
# frames that only pass a call on, so a deprecated argument in it was written by their caller:
# nn.Module.__call__, decorators, and peft's wrappers' forward(*args, **kwargs)
_PLUMBING = ("torch.nn.modules.module", "torch.utils._contextlib", "functools", "contextlib")


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _passes_on(frame) -> bool:
    return _module(frame) in _PLUMBING or (_module(frame).startswith("peft.") and frame.f_code.co_name == "forward")


def mmkit_caller(frame):
    """"file:line" of the mmkit frame that called the API whose code issued the warning, else None.

    ``frame`` is any frame at or below the one that called ``warnings.warn``.
    """
    while _module(frame) in _WARNINGS:
        frame = frame.f_back
    issuer = _module(frame).split(".")[0]
    if issuer in _OURS:  # mmkit's own warning: pyproject's filterwarnings handles those
        return None
    while frame is not None and (_module(frame).split(".")[0] == issuer or _passes_on(frame)):
        frame = frame.f_back
    if frame is not None and _module(frame).split(".")[0] in _OURS:
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return None


@pytest.fixture(autouse=True)
def _no_deprecated_api_from_mmkit(monkeypatch):
    found = []
    show = warnings.showwarning  # under pytest: records the warning for its summary

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            caller = mmkit_caller(sys._getframe(1))
            if caller is not None:
                found.append(f"{caller} calls a deprecated API: {category.__name__}: {message}")
        show(message, category, filename, lineno, file, line)

    monkeypatch.setattr(warnings, "showwarning", check)
    yield
    if found:
        pytest.fail("mmkit called a deprecated API:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)
