"""Sequential calibration (``layerfold.engine.sequential``): calibrated steps refitted on the inputs the folded
layers before them produce, with the original's outputs as targets."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, outputs, sample_inputs

from layerfold.engine.calibrate import Calibration
from layerfold.core.families import family_of, linear_weight
from layerfold.folding.in_memory import fold
from layerfold.operations import Factor, Tie
from layerfold.operations.plan import FoldPlan
from layerfold.engine.sequential import retarget
from layerfold.core.store import fold_state


def calibration_of(model):
    batches = [sample_inputs(seed=s, batch=4, length=32) for s in range(8)]  # more tokens than any input width
    return Calibration(model, batches).statistics(progress=False)


def low_rank_plan(model, rank: int = 3) -> FoldPlan:
    """Every projection of layer 0 at a low rank, and layer 1's MLP input projections too."""
    family = family_of(model)
    ops = [Factor([0], p, rank) for p in family.projections]
    ops += [Factor([1], p, rank) for p in family.projections if p not in family.shared_projections("attention")][:1]
    return FoldPlan(4, ops)


def projection_inputs(model, layer: int, projection: str, batches) -> torch.Tensor:
    """The rows a projection of one layer reads on the calibration batches."""
    module = family_of(model).layer_list(model)[layer].get_submodule(projection)
    rows = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        handle.remove()
    return torch.cat(rows).double()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "qwen2"])
def test_a_sequential_fit_is_closer_to_the_original_outputs_on_the_folded_inputs(family):
    model = build_tiny(family)
    stats = calibration_of(model)
    plan = low_rank_plan(model)
    target_projection = plan.operations[-1].projection
    folds = {
        sequential: fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), calibration=stats, progress=False,
                         sequential=sequential)
        for sequential in (False, True)
    }  # fmt: skip
    original_x = projection_inputs(model, 1, target_projection, stats.batches)
    weight = linear_weight(family_of(model).layer_list(model)[1].get_submodule(target_projection)).double()
    errors = {}
    for sequential, folded in folds.items():
        # Layer 0 is fitted the same way in both (nothing before it changed), so layer 1 reads the same inputs.
        folded_x = projection_inputs(folded, 1, target_projection, stats.batches)
        fitted = family_of(folded).layer_list(folded)[1].get_submodule(target_projection).merged_weight().double()
        errors[sequential] = float((original_x @ weight.T - folded_x @ fitted.T).square().sum())
    assert errors[True] < errors[False], errors
    assert fold_state(folds[True]).plan.provenance["sequential"] is True
    assert fold_state(folds[False]).plan.provenance["sequential"] is False


def test_layer_zero_is_fitted_the_same_way_sequentially():
    model = build_tiny("llama")
    stats = calibration_of(model)
    plan = FoldPlan(4, [Factor([0], "mlp.up_proj", 3)])  # nothing before layer 0: the inputs are the original's
    a = fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), calibration=stats, progress=False, sequential=False)
    b = fold(copy.deepcopy(model), plan, calibration=stats, progress=False, sequential=True)
    inputs = sample_inputs()
    assert torch.equal(outputs(a, inputs), outputs(b, inputs))


def test_sequential_fit_of_an_identity_plan_changes_nothing():
    model = build_tiny("llama")
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    folded = fold(copy.deepcopy(model), FoldPlan.identity(4), calibration=calibration_of(model), progress=False,
                  sequential=True)  # fmt: skip
    assert torch.equal(outputs(folded, inputs), expected)


def test_sequential_ties_refit_and_stay_shared():
    model = build_tiny("llama")
    stats = calibration_of(model)
    plan = FoldPlan(4, [Factor([0], "self_attn.o_proj", 2), Tie(layers=[1, 3], fit="lstsq", rank=2, whiten=True)])
    seq = fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), calibration=stats, progress=False,
               sequential=True)  # fmt: skip
    plain = fold(copy.deepcopy(model), FoldPlan.from_dict(plan.to_dict()), calibration=stats, progress=False,
                 sequential=False)  # fmt: skip
    layers = family_of(seq).layer_list(seq)
    assert layers[1].self_attn.q_proj.shared is layers[3].self_attn.q_proj.shared  # one tensor, refitted once
    shared = lambda m: family_of(m).layer_list(m)[1].self_attn.q_proj.shared.weight  # noqa: E731
    assert not torch.equal(shared(seq), shared(plain))  # the inputs of layer 1 changed: the fit did too


def test_retarget_is_the_least_squares_map_from_folded_to_original_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    x_folded = x + 0.1 * torch.randn(200, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mapped = retarget(weight, x.T @ x_folded, x_folded.T @ x_folded)
    exact = torch.linalg.lstsq(x_folded, x @ weight.T).solution.T
    torch.testing.assert_close(mapped, exact, rtol=1e-3, atol=1e-4)
