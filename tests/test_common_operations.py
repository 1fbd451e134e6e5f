"""One tester over every registered operation (``layerfold.operations.OPERATIONS``) on a decoder, GPT-2's Conv1D
layout and an encoder (tiny random models): the operation describes itself (the plan's description changes with
it; it needs calibration data exactly when it says so; ``keeps_architecture`` is true exactly when the fold holds
none of layerfold's modules), builds, saves → loads bit for bit, exports to the same outputs, and folds a
checkpoint on disk to exactly the tensors of the in-memory fold (its recipes). A new operation is tested here by
its own ``example`` (``Operation.example``): the first test fails until every registered kind has one."""

from __future__ import annotations

import copy

import pytest
from conftest import assert_same_checkpoint, assert_saves_loads_and_exports, build_tiny, in_memory_fold, sample_inputs

from layerfold import LayerfoldError
from layerfold.engine.calibrate import Calibration
from layerfold.folding.in_memory import fold
from layerfold.operations import OPERATIONS
from layerfold.operations.base import FoldedProjection
from layerfold.operations.geometry import NO_HEAD_PRUNING
from layerfold.operations.plan import FoldPlan
from layerfold.core.store import STATE_ATTRIBUTE
from layerfold.folding.streamed import stream_fold


# kind -> the operations of a small plan that uses it on a 4-layer model: each operation's own ``example``.
EXAMPLES = {kind: op.example for kind, op in OPERATIONS.items()}
FAMILIES = ("llama", "gpt2", "bert")


def batches(model=None) -> list[dict]:
    return [sample_inputs(seed=s, batch=2, length=16) for s in range(3)]


@pytest.mark.parametrize("kind", sorted(OPERATIONS))
def test_every_registered_operation_has_an_example(kind):
    example = OPERATIONS[kind].example(build_tiny("llama"))
    assert any(type(op) is OPERATIONS[kind] for op in example)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(OPERATIONS))
def test_every_operation_on_every_layout(kind, family, tmp_path):
    model = build_tiny(family)
    plan = FoldPlan(4, EXAMPLES[kind](model))
    if kind == "prune-heads" and family in NO_HEAD_PRUNING:  # GPT-2's fused c_attn: refused in one line
        with pytest.raises(LayerfoldError, match=f"cannot prune {family}"):
            plan.validate(model)
        return
    plan.validate(model)

    # It describes itself: the plan says what it does, and whether it needs calibration data.
    assert plan.describe() != FoldPlan(4, []).describe()
    assert plan.whitens() == any(op.needs_calibration() for op in plan.operations)
    if plan.whitens():
        with pytest.raises(LayerfoldError, match=plan.calibrated_steps()):
            fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), progress=False)
    statistics = Calibration(model, batches()).statistics(progress=False) if plan.whitens() else None
    folded = fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), calibration=statistics, progress=False)
    layerfold_modules = any(isinstance(m, FoldedProjection) for m in folded.modules()) or bool(
        getattr(folded.base_model, STATE_ATTRIBUTE, None)
    )
    assert plan.keeps_base_architecture() == (not layerfold_modules)

    # Saved and loaded bit for bit; exported to the same outputs as a plain model.
    assert_saves_loads_and_exports(folded, tmp_path)

    # Streamed from a checkpoint on disk: the very tensors of the in-memory fold (every stored tensor's recipe).
    source = tmp_path / "original"
    model.save_pretrained(source)
    stream_fold(source, tmp_path / "streamed", FoldPlan.from_dict(plan.to_dict()), calibration=batches, progress=False)
    memory = in_memory_fold(source, plan, tmp_path / "memory", batches if plan.whitens() else None)
    assert_same_checkpoint(tmp_path / "streamed", memory)
