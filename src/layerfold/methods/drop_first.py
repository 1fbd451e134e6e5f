"""drop-first: keep the first K blocks, remove the rest (K from the budget)."""

from __future__ import annotations

from .registry import Method, drop_plan, register_method, unique_blocks_for


def plan(model, budget, calibration, options):
    return drop_plan(model, list(range(unique_blocks_for(model, budget))))


METHOD = register_method(Method("drop-first", "keep the first K blocks, remove the rest", plan, streams=True))
