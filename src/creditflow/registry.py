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


def check_options(kind: str, name: str, builder: Callable, options: dict[str, Any]) -> None:
    """One-line ValueError for an option ``builder`` does not take, or whose value is not of its default's type.

    Option values come from YAML scalars (``--rule-option feedback_scale=abc`` is the string
    ``'abc'``); without this a bad one fails deep inside the builder (``'>' not supported ...``).
    """
    import inspect

    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin: nothing to check against
        return
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = ", ".join(f"{n}={p.default!r}" for n, p in named.items() if p.default is not p.empty)
    for key, value in options.items():
        if key not in named:
            if not takes_any:
                raise ValueError(f"bad options for {kind} {name!r}: unknown option {key!r}; its options: "
                                 f"{allowed or 'none'}")
            continue
        default = named[key].default
        expected = _kind_of(default) or _ANNOTATED.get(_first_type(named[key].annotation))
        if value is None and default is None:
            continue
        if expected is not None and _kind_of(value) not in _ACCEPTS[expected]:
            raise ValueError(f"bad options for {kind} {name!r}: {key} must be {expected} (default {default!r}), "
                             f"got {value!r}")


def _kind_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return None


def _first_type(annotation: Any) -> str:
    """``"int | None"`` (a string under ``from __future__ import annotations``) -> ``"int"``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return text.split("|")[0].strip()


_ANNOTATED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
#: what a value may be, by its default's kind: a number default takes an integer too
_ACCEPTS = {"true or false": {"true or false"}, "an integer": {"an integer"},
            "a number": {"a number", "an integer"}, "a string": {"a string"}}
