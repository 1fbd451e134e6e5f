"""original: the model as it is (the reference row of a sweep)."""

from __future__ import annotations

from .registry import Method, register_method


def plan(model, budget, calibration, options) -> None:
    return None


METHOD = register_method(Method("original", "the model as it is", plan))
