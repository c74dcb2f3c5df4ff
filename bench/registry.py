"""One generic lazy registry for methods and tasks.

Names come from entry-point groups (``bench.methods``, ``bench.tasks``); built-ins are registered the
same way, in this project's ``pyproject.toml``, so a plugin is a first-class citizen. Nothing is
imported until an entry is loaded; ``describe`` reads a class's docstring and ``domains`` with `ast`,
so ``bench ls`` never imports torch. Duplicate names raise; unknown names get "did you mean".
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from bench import BenchError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attr"
    dist: str  # distribution that declared it ("<runtime>" for register())


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] | None = None
        self._runtime: dict[str, Entry] = {}
        self._loaded: dict[str, Any] = {}

    # --- discovery ---------------------------------------------------------------------------
    def _scan(self) -> dict[str, Entry]:
        if self._entries is None:
            found: dict[str, Entry] = {}
            for ep in entry_points(group=self.group):
                dist = ep.dist.name if ep.dist is not None else "?"
                entry = Entry(ep.name, ep.value, dist)
                if ep.name in found and found[ep.name].target != ep.value:
                    other = found[ep.name]
                    raise BenchError(
                        f"duplicate {self.kind} name {ep.name!r}: declared by {other.dist} "
                        f"({other.target}) and by {dist} ({ep.value}); uninstall one of them"
                    )
                found[ep.name] = entry
            self._entries = found
        return {**self._entries, **self._runtime}

    def register(self, name: str, target: str | type) -> None:
        """Register at run time (tests, notebooks). ``target`` is "module:attr" or the class."""
        if name in self._scan():
            raise BenchError(f"duplicate {self.kind} name {name!r}: already registered "
                             f"as {self._scan()[name].target}")
        if isinstance(target, str):
            self._runtime[name] = Entry(name, target, "<runtime>")
        else:
            self._runtime[name] = Entry(name, f"{target.__module__}:{target.__qualname__}", "<runtime>")
            self._loaded[name] = target

    def unregister(self, name: str) -> None:
        self._runtime.pop(name, None)
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._scan())

    def __contains__(self, name: str) -> bool:
        return name in self._scan()

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise with suggestions and the valid names."""
        entries = self._scan()
        if name in entries:
            return name
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.6)
        hint = f" — did you mean {' or '.join(close)}?" if close else ""
        raise BenchError(f"unknown {self.kind} {name!r}{hint} Valid {self.kind}s: {', '.join(sorted(entries))}")

    # --- loading -----------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._loaded:
            entry = self._scan()[name]
            module_name, _, attr = entry.target.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise BenchError(
                    f"{self.kind} {name!r} ({entry.target}, from {entry.dist}) failed to load: {exc}"
                ) from exc
            if getattr(obj, "name", None) != name:
                raise BenchError(f"{self.kind} {name!r} points at {entry.target}, whose name is "
                                 f"{getattr(obj, 'name', None)!r}; the two must agree")
            self._loaded[name] = obj
        return self._loaded[name]

    def describe(self, name: str) -> dict[str, Any]:
        """Summary line and class-level literals of an entry, read from source without importing."""
        entry = self._scan()[self.check(name)]
        if name in self._loaded:
            cls = self._loaded[name]
            doc = (cls.__doc__ or "").strip().splitlines()
            return {"name": name, "summary": doc[0] if doc else "", "target": entry.target,
                    "domain": getattr(cls, "domain", None), "domains": sorted(getattr(cls, "domains", ()) or ()),
                    "subtasks": list(getattr(cls, "subtasks", ()) or ())}
        module_name, _, attr = entry.target.partition(":")
        info: dict[str, Any] = {"name": name, "summary": "", "target": entry.target}
        try:
            spec = importlib.util.find_spec(module_name)
            origin = spec.origin if spec else None
            if origin and origin.endswith(".py"):
                with open(origin, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read(), filename=origin)
                for node in tree.body:
                    if isinstance(node, ast.ClassDef) and node.name == attr.split(".")[-1]:
                        doc = (ast.get_docstring(node) or "").strip().splitlines()
                        info["summary"] = doc[0] if doc else ""
                        for stmt in node.body:
                            target = getattr(stmt, "target", None) or (stmt.targets[0] if isinstance(stmt, ast.Assign) else None)
                            if isinstance(target, ast.Name) and target.id in ("domain", "domains", "subtasks", "role"):
                                try:
                                    value = ast.literal_eval(_strip_frozenset(stmt.value))
                                except ValueError:
                                    continue
                                info[target.id] = sorted(value) if isinstance(value, (set, frozenset)) else value
        except (ImportError, OSError, SyntaxError):
            pass
        if isinstance(info.get("subtasks"), tuple):
            info["subtasks"] = list(info["subtasks"])
        return info


def _strip_frozenset(node: ast.AST) -> ast.AST:
    """``frozenset({...})`` -> ``{...}`` so that literal_eval can read it."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "frozenset" and node.args:
        return node.args[0]
    return node


methods: Registry = Registry("method", "bench.methods")
tasks: Registry = Registry("task", "bench.tasks")


def parse_task_spec(spec: str) -> tuple[str, list[str]]:
    """``glue`` -> (glue, all subtasks); ``glue/sst2`` -> (glue, [sst2]). Raises on unknown names."""
    name, _, sub = spec.partition("/")
    tasks.check(name)
    info = tasks.describe(name)
    subtasks = info.get("subtasks") or []
    if not sub:
        return name, list(subtasks)
    chosen = [s.strip() for s in sub.split(",") if s.strip()]
    for s in chosen:
        if subtasks and s not in subtasks:
            close = difflib.get_close_matches(s, subtasks, n=2, cutoff=0.6)
            hint = f" — did you mean {' or '.join(close)}?" if close else ""
            raise BenchError(f"unknown subtask {name}/{s}{hint} Valid subtasks of {name}: {', '.join(subtasks)}")
    return name, chosen
