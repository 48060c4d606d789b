"""Credit-assignment rules, built by name.

>>> rule = build("dfa", model, num_classes=10)
"""

from __future__ import annotations

from typing import Any

import torch
import yaml
from torch import nn

from ..registry import RULES, check_options
from . import (  # noqa: F401  (import is registration)
    activation_sharing,
    associated_learning,
    bp,
    dfa,
    drtp,
    dtp,  # noqa: F401
    fa,
    forward_alignment,
    kolen_pollack,
    las,
    local_classifier,
    shallow,
    sign_symmetry,
    weight_mirror,
)
from .base import DirectRule, Rule, StepResult, UnitRule


def build(name: str, model: nn.Module, num_classes: int, **options) -> Rule:
    """Wrap ``model`` in the rule ``name``; options go to the rule's constructor."""
    entry = RULES.get(name)
    compiled = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    if compiled:  # torch.compile(model) before the rule: the rule needs the module; it compiles its forward
        model = model._orig_mod
    refusal = entry.builder.model_refusal(model)
    if refusal:
        raise ValueError(f"rule {name!r} {refusal}")
    check_options("rule", name, entry.builder, options)
    try:
        rule = entry.builder(model, num_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad options for rule {name!r}: {err}") from None
    if compiled:
        rule.compile()
    return rule


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dfa:feedback_init=product:seed=3"`` -> ``("dfa", {"feedback_init": "product", "seed": 3})``.

    Values are read as YAML scalars (``3`` an int, ``true`` a bool); dashes in keys become underscores.
    """
    name, *pairs = [part.strip() for part in spec.split(":")]
    if name not in RULES:
        raise ValueError(RULES.unknown_message(name))
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad rule spec {spec!r}: expected name:key=value[:key=value], got {pair!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    return name, options


def build_spec(spec: str, model: nn.Module, num_classes: int, **options) -> Rule:
    """:func:`build` from a spec with options after colons, e.g. ``"asap:k=4"``; ``options`` add to them."""
    name, spec_options = parse_spec(spec)
    return build(name, model, num_classes, **{**spec_options, **options})


def available() -> list[str]:
    return RULES.available()


__all__ = ["DirectRule", "Rule", "StepResult", "UnitRule", "available", "build", "build_spec", "parse_spec"]
