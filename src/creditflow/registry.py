"""Name -> builder registries for rules, models and datasets.

Import is registration (as in timm): each module decorates its builders, and the
package ``__init__`` imports the modules. Unknown names get one line naming what exists.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    summary: str = ""
    paper: str = ""


@dataclass
class Registry:
    """A named collection of builders, e.g. ``Registry("rule")``."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def register(self, name: str, *, summary: str = "", paper: str = ""):
        def decorate(builder):
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self.entries[name] = Entry(name, builder, summary, paper)
            return builder

        return decorate

    def get(self, name: str) -> Entry:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        try:
            return self.entries[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        names = sorted(self.entries)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (closest: {close[0]})" if close else ""
        return f"unknown {self.kind} {name!r}; available: {', '.join(names)}{hint}"

    def available(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries


RULES = Registry("rule")
MODELS = Registry("model")
DATASETS = Registry("dataset")

register_rule = RULES.register
register_model = MODELS.register
register_dataset = DATASETS.register
