"""drop-even: keep K evenly spaced blocks, first and last included (K from the budget)."""

from __future__ import annotations

from .registry import Candidate, Method, drop_plan, evenly_spaced, num_layers, register_method, unique_blocks_for


def plan(model, budget, calibration, options):
    return drop_plan(model, evenly_spaced(num_layers(model), unique_blocks_for(model, budget)))


METHOD = register_method(
    Method(
        "drop-even",
        "keep K evenly spaced blocks (first and last included), remove the rest",
        plan,
        streams=True,
        candidates=lambda analysis: [Candidate("drop: evenly spaced", "drop")],
    )
)
