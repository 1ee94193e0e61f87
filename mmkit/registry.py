"""Registries: exact names to builders, with explicit aliases and entry-point plug-ins.

    from mmkit.registry import encoders

    @encoders.register("clip", aliases=("clip-vit",))
    def build_clip(cfg): ...

    encoders.get("clip")          # -> build_clip
    encoders.names()              # -> ["clip", ...]
    encoders.get("clipp")         # UnknownNameError: unknown encoder 'clipp'; did you mean 'clip'? choices: ...

Third-party packages register through entry points in the groups ``mmkit.encoders``,
``mmkit.connectors``, ``mmkit.llms``, ``mmkit.templates``, ``mmkit.tokenizers``,
``mmkit.data_sources``, ``mmkit.scorers`` and ``mmkit.plugins``. Each entry point names an
object; loading it is enough for it to register itself (a module that uses the decorator),
or, if it is any other object not yet registered (a function, a class, a plug-in instance),
it is registered under the entry point's name.

What the entries of the last four registries are:

* ``tokenizers``: a function with no required argument returning a tokenizer
  (``model.llm.tokenizer: builtin:NAME``).
* ``data_sources``: ``resolve(arg, ctx) -> (LLaVA JSON path, image folder)`` for a data source
  whose ``path`` is ``NAME:ARG`` (``ctx`` is a :class:`mmkit.data.dataset.SourceContext`).
* ``scorers``: ``score(answers, annotations, strict=False) -> metrics`` for
  ``python -m mmkit.eval.score --task NAME`` and ``eval.task``.
* ``plugins``: a :class:`mmkit.plugin.Plugin` (an ``options`` dataclass and hooks), active in a
  run whose recipe has the key ``plugins.NAME``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import types
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class UnknownNameError(KeyError):
    """An unknown registry key. ``str(err)`` is one sentence naming the choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``name``, or None if nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


class Registry:
    """Maps exact names (and explicit aliases) to objects, usually builder functions."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtin: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtin = builtin  # module whose import registers mmkit's own entries
        self._items: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, name: str, *, aliases: Iterable[str] = (), obj: Any = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(target: Any) -> Any:
            for key in (name, *aliases):
                if key in self._items or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[name] = target
            for alias in aliases:
                self._aliases[alias] = name
            return target

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> Any:
        """Remove ``name`` and its aliases (e.g. a test's temporary entry); returns the removed object."""
        key = self.canonical(name)
        target = self._items.pop(key)
        self._aliases = {a: n for a, n in self._aliases.items() if n != key}
        return target

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if self.builtin:
            importlib.import_module(self.builtin)
        if self.entry_point_group is None:
            return
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                target = ep.load()
            except Exception as exc:  # a broken plug-in must not break mmkit
                log.warning("could not load %s plug-in %r (%s): %s", self.kind, ep.name, ep.value, exc)
                continue
            already = ep.name in self._items or ep.name in self._aliases
            if not already and not isinstance(target, types.ModuleType) and target not in self._items.values():
                self.register(ep.name, obj=target)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases); raises UnknownNameError."""
        self._load_plugins()
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        choices = self.names(include_aliases=True)
        hint = closest(name, choices)
        did_you_mean = f"; did you mean {hint!r}?" if hint else ";"
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{did_you_mean} choices: {', '.join(self.names()) or '(none registered)'}"
        )

    def get(self, name: str) -> Any:
        return self._items[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._items or name in self._aliases

    def names(self, include_aliases: bool = False) -> list[str]:
        self._load_plugins()
        keys = list(self._items)
        if include_aliases:
            keys += list(self._aliases)
        return sorted(keys)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


encoders = Registry("encoder", "mmkit.encoders", builtin="mmkit.encoders")
connectors = Registry("connector", "mmkit.connectors", builtin="mmkit.connectors")
llms = Registry("llm", "mmkit.llms", builtin="mmkit.llms")
templates = Registry("template", "mmkit.templates", builtin="mmkit.templates")
tokenizers = Registry("tokenizer", "mmkit.tokenizers")
data_sources = Registry("data source", "mmkit.data_sources")
scorers = Registry("task", "mmkit.scorers", builtin="mmkit.eval.scorers")
plugins = Registry("plugin", "mmkit.plugins")

Builder = Callable[..., Any]
