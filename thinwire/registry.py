"""Closed name -> class registries, extensible through Python entry points.

Names in checkpoints and dashboards must stay stable, so each registry is a fixed
dict; third-party packages add entries through an entry-point group (e.g.
``[project.entry-points."thinwire.optim"] myopt = "pkg.mod:MyPlugin"``), loaded the
first time a name is not found. Unknown names raise one line listing valid ones.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.group = entry_point_group
        self._items: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # entry points that failed to load: name -> why
        self._loaded_entry_points = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj
        return deco

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points or not self.group:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue  # built-in names cannot be overridden
            try:
                self._items[ep.name] = ep.load()
            except Exception as e:  # one broken plugin must not break runs that do not use it
                self._broken[ep.name] = f"entry point {ep.value} failed to load: {type(e).__name__}: {e}"

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._items:
            self._load_entry_points()
        if name in self._broken:
            raise ValueError(f"{key or self.kind}={name}: {self._broken[name]}")
        if name not in self._items:
            raise ValueError(f"{key or self.kind}={name!r}: unknown {self.kind}; valid: {', '.join(self.names())}")
        return self._items[name]

    def entries(self) -> dict[str, T]:
        """Every entry, built in and from entry points, by name."""
        self._load_entry_points()
        return dict(sorted(self._items.items()))

    def items(self):
        return self.entries().items()

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items
