"""The delta method (DeltaLLM): adjacent runs share a least-squares weight; each layer keeps a whitened delta whose
rank fills the budget."""

from __future__ import annotations

import copy

import pytest
from conftest import build_tiny, sample_inputs

from layerfold import LayerfoldError
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration
from layerfold.folding.in_memory import fold
from layerfold.methods import registry
from layerfold.methods.delta import adjacent_groups
from layerfold.core.report import parameter_breakdown

DELTA = registry.get("delta")


def calibrated(model) -> Calibration:
    return Calibration(model, [sample_inputs(seed=s, batch=2, length=16) for s in range(3)])


def test_adjacent_groups_cover_every_layer_once():
    assert adjacent_groups(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert adjacent_groups(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.9])
def test_the_delta_rank_is_the_largest_the_budget_allows(keep):
    model = build_tiny("llama")
    calibration = calibrated(model)
    budget = Budget(keep, blocks_only=True)
    plan = DELTA.plan(model, budget, calibration)
    ties = plan.ties()
    assert all(op.fit == "lstsq" and op.whiten for op in ties)
    assert all(g.layers == list(range(g.layers[0], g.layers[-1] + 1)) for g in ties)  # adjacent
    statistics = calibration.statistics(progress=False)
    folded = fold(copy.deepcopy(model), plan, calibration=statistics, progress=False)
    allowed = parameter_breakdown(model)["blocks"] - budget.reduction(model)
    assert parameter_breakdown(folded)["blocks"] <= allowed
    for op in plan.ties():
        op.rank += 1
    larger = fold(copy.deepcopy(model), plan, calibration=statistics, progress=False)
    assert parameter_breakdown(larger)["blocks"] > allowed


def test_a_group_too_small_for_the_budget_is_one_clear_line():
    model = build_tiny("llama")
    with pytest.raises(LayerfoldError, match="no room for a delta of rank 1; use a larger --group"):
        DELTA.plan(model, Budget(0.3, blocks_only=True), calibrated(model), group=2)
    with pytest.raises(LayerfoldError, match="--group: must be between 2"):
        DELTA.plan(model, Budget(0.5, blocks_only=True), calibrated(model), group=1)
