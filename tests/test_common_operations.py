"""One tester over every registered operation (``layerfold.operations.OPERATIONS``) on a decoder, GPT-2's Conv1D
layout and an encoder (tiny random models): the operation describes itself (the plan's description changes with
it; it needs calibration data exactly when it says so; ``keeps_architecture`` is true exactly when the fold holds
none of layerfold's modules), builds, saves → loads bit for bit, exports to the same outputs, and folds a
checkpoint on disk to exactly the tensors of the in-memory fold (its recipes). A new operation is tested here by
adding its example below: the first test fails until every registered kind has one."""

from __future__ import annotations

import copy

import pytest
from conftest import assert_same_checkpoint, assert_saves_loads_and_exports, build_tiny, in_memory_fold, sample_inputs

from layerfold import LayerfoldError
from layerfold.engine.calibrate import Calibration
from layerfold.core.families import family_of
from layerfold.folding.in_memory import fold
from layerfold.operations import OPERATIONS, Drop, Factor, Merge, PruneChannels, PruneHeads, Tie
from layerfold.operations.base import FoldedProjection
from layerfold.operations.geometry import NO_HEAD_PRUNING, channel_width
from layerfold.operations.plan import FoldPlan
from layerfold.core.store import STATE_ATTRIBUTE
from layerfold.folding.streamed import stream_fold


def _half_the_channels(model) -> list[int]:
    family = family_of(model)
    return list(range(0, channel_width(family.layer_list(model)[0], family), 2))


# kind -> the operations of a small plan that uses it on a 4-layer model (a merge needs the drop that removes
# the merged-away layer); calibrated where the operation can be, so that its fitted path is tested too.
EXAMPLES = {
    "tie": lambda model: [Tie(layers=[0, 2], rank=2, fit="lstsq", whiten=True)],
    "merge": lambda model: [Merge(into=1, layers=[2]), Drop(layers=[2])],
    "factor": lambda model: [Factor(layers=[0, 1], projection=family_of(model).projections[0], rank=4)],
    "prune-channels": lambda model: [PruneChannels(layers=[1, 3], keep=[_half_the_channels(model)] * 2)],
    "prune-heads": lambda model: [PruneHeads(layers=[1], keep=[[0, 1]])],  # one whole key/value group under GQA
    "drop": lambda model: [Drop(layers=[3])],
}
FAMILIES = ("llama", "gpt2", "bert")


def batches(model=None) -> list[dict]:
    return [sample_inputs(seed=s, batch=2, length=16) for s in range(3)]


def test_every_registered_operation_has_an_example():
    assert sorted(EXAMPLES) == sorted(OPERATIONS)


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
