"""Credit-assignment rules, built by name.

>>> rule = build("dfa", model, num_classes=10)
"""

from __future__ import annotations

from torch import nn

from ..registry import RULES
from . import activation_sharing, bp, dfa, drtp, fa, forward_alignment, kolen_pollack, las, local_classifier, shallow, sign_symmetry, weight_mirror  # noqa: F401  (import is registration)
from .base import DirectRule, Rule, StepResult


def build(name: str, model: nn.Module, num_classes: int, **options) -> Rule:
    """Wrap ``model`` in the rule ``name``; options go to the rule's constructor."""
    entry = RULES.get(name)
    try:
        return entry.builder(model, num_classes, **options)
    except TypeError as err:
        raise ValueError(f"bad options for rule {name!r}: {err}") from None


def available() -> list[str]:
    return RULES.available()


__all__ = ["DirectRule", "Rule", "StepResult", "build", "available"]
