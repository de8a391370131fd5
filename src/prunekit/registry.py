"""One small registry class, shared by criteria, schedules, models and layer handlers.

A registry maps a name to an object (usually a callable). Unknown names raise
:class:`~prunekit.errors.UnknownNameError` (a ``PrunekitError`` and a ``KeyError``) that lists the
known ones, so a typo on the command line tells the user what they could have written; registering
a name twice raises :class:`~prunekit.errors.PrunekitError`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

from prunekit.errors import PrunekitError, UnknownNameError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Any] = {}

    def register(self, name: Optional[str] = None, *, overwrite: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REG.register("l1")`` (or bare name from ``obj.__name__``)."""

        def deco(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._items and not overwrite:
                raise PrunekitError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" (a list from a recipe) is unknown too
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
