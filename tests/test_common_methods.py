"""One tester over every registered method × every supported family (tiny random models): the budget is met,
save → load gives the same outputs bit for bit, export gives the same outputs, and a method that streams folds a
checkpoint on disk to exactly the tensors of the in-memory fold. A new method or family is tested here by
registering it."""

from __future__ import annotations

import copy

import pytest
from conftest import (
    FAMILY_NAMES,
    assert_same_checkpoint,
    assert_saves_loads_and_exports,
    build_tiny,
    in_memory_fold,
    sample_inputs,
)

from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration
from layerfold.folding.in_memory import fold
from layerfold.methods import registry
from layerfold.operations.plan import FoldPlan
from layerfold.core.report import parameter_breakdown
from layerfold.folding.streamed import stream_fold

METHODS = [name for name in registry.REGISTRY if name != "original"]
BUDGET = Budget(0.6, blocks_only=True)


def batches(model=None) -> list[dict]:
    return [sample_inputs(seed=s, batch=2, length=16) for s in range(3)]


def options_of(method: registry.Method) -> dict:
    """The first option set the quick benchmark sweep runs, streamable if the method streams."""
    options = dict(method.variants(True)[0])
    if method.streams not in (True, False) and method.why_not_streamed(options) is not None:
        options = {}  # the defaults stream (uniform ranks)
    return options


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_every_family(name, family, tmp_path):
    method = registry.get(name)
    model = build_tiny(family)
    calibration = Calibration(model, batches())
    options = options_of(method)
    plan = method.plan(model, BUDGET, calibration, **options)
    folded = fold(copy.deepcopy(model), plan, calibration=calibration.statistics(progress=False), progress=False)

    # The budget: whole-block methods round to a whole block; the others keep no more than allowed.
    before, after = parameter_breakdown(model)["blocks"], parameter_breakdown(folded)["blocks"]
    slack = before / len(plan.kept_layers()) / 2 / before if not plan.factors() else 0.0
    assert after / before <= BUDGET.keep + slack + 1e-9, (after / before, plan.describe())

    # Saved and loaded: the same outputs, bit for bit; exported: the same outputs as a plain model.
    assert_saves_loads_and_exports(folded, tmp_path)

    # Streamed from a checkpoint on disk: the very tensors of the in-memory fold of the same plan.
    if method.streams is False:
        return
    source = tmp_path / "original"
    model.save_pretrained(source)
    streamed = tmp_path / "streamed"
    report = stream_fold(
        source, streamed, lambda skeleton: method.streamed_plan(skeleton, BUDGET, **options), calibration=batches,
        progress=False,
    )  # fmt: skip
    streamed_plan = FoldPlan.from_dict(report["plan"].to_dict())  # the plan as saved
    memory = in_memory_fold(source, streamed_plan, tmp_path / "memory", batches if streamed_plan.whitens() else None)
    assert_same_checkpoint(streamed, memory)
