"""How a tie group's shared weights and relaxations are fitted to calibration data: least squares over the
members' input Gram matrices (``fit: lstsq``) and relaxations truncated in the space whitened by each layer's
inputs (``whiten``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILY_NAMES, build_tiny, outputs, sample_inputs

from layerfold.engine.calibrate import Calibration
from layerfold.core.errors import LayerfoldError
from layerfold.core.families import family_of, linear_weight
from layerfold.folding.in_memory import fold
from layerfold.operations import Tie
from layerfold.operations.tie.build import least_squares
from layerfold.operations.plan import FoldPlan
from layerfold.core.store import fold_state


def statistics_of(model, count: int = 3, batch: int = 2):
    batches = [sample_inputs(seed=s, batch=batch, length=16 * batch) for s in range(count)]
    return Calibration(model, batches).statistics(progress=False)


def shared_weights(folded, key="tie_0"):
    """Each shared projection's weight of one tie, in nn.Linear layout, by projection path."""
    entry = fold_state(folded)[key]
    return {
        path: (module.weight.t() if module.transposed else module.weight).detach()
        for path, module in entry.named_modules()
        if hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter)
    }


def output_error(original, folded_weight, gram) -> float:
    """Σ over calibration tokens of ‖(W − W_folded) x‖²: tr(Δ G Δᵀ)."""
    delta = original.detach().double() - folded_weight.detach().double()
    return float(torch.trace(delta @ gram.double() @ delta.T))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lstsq_with_one_source_reproduces_that_layer(family):
    model = build_tiny(family)
    stats = statistics_of(model)
    plan = FoldPlan(4, [Tie(layers=[0, 2], sources=[2], fit="lstsq")])
    folded = fold(copy.deepcopy(model), plan, calibration=stats, progress=False, sequential=False)
    layers = family_of(model).layer_list(model)
    for path, weight in shared_weights(folded).items():
        torch.testing.assert_close(weight, linear_weight(layers[2].get_submodule(path)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_lstsq_of_identical_layers_reproduces_them(family):
    model = build_tiny(family)
    layers = family_of(model).layer_list(model)
    layers[3].load_state_dict(layers[1].state_dict())  # layers 1 and 3 are the same block
    stats = statistics_of(model)
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    folded = fold(copy.deepcopy(model), FoldPlan(4, [Tie(layers=[1, 3], fit="lstsq")]), calibration=stats, progress=False, sequential=False)
    torch.testing.assert_close(outputs(folded, inputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lstsq_output_error_is_never_above_the_average(family):
    model = build_tiny(family)
    stats = statistics_of(model)
    group = [0, 1, 3]
    fits = {
        fit: shared_weights(fold(copy.deepcopy(model), FoldPlan(4, [Tie(layers=group, fit=fit)]), calibration=stats, progress=False, sequential=False))
        for fit in ("mean", "lstsq")
    }  # fmt: skip
    layers = family_of(model).layer_list(model)
    for path in fits["mean"]:
        errors = {
            fit: sum(
                output_error(linear_weight(layers[i].get_submodule(path)), fits[fit][path], stats.gram(i, path))
                for i in group
            )
            for fit in fits
        }
        assert errors["lstsq"] <= errors["mean"] * (1 + 1e-9), (path, errors)
        assert errors["lstsq"] < errors["mean"], (path, errors)  # random layers differ: a real improvement


def test_least_squares_solves_the_normal_equations():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(40, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x for x in inputs]
    fitted = least_squares(weights, grams)
    stacked_in = torch.cat(inputs)
    stacked_out = torch.cat([x @ w.T for x, w in zip(inputs, weights)])
    exact = torch.linalg.lstsq(stacked_in, stacked_out).solution.T  # no damping
    torch.testing.assert_close(fitted, exact, rtol=1e-2, atol=1e-3)  # the damping moves it only slightly


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_rank_whitened_relaxation_reproduces_the_original(family, sequential):
    model = build_tiny(family)
    # A sequential refit needs more calibration tokens than any input width to determine its maps.
    stats = statistics_of(model, count=8 if sequential else 3, batch=4 if sequential else 2)
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    plan = FoldPlan.cycle(4, 2, fit="lstsq", rank="full", whiten=True)
    folded = fold(copy.deepcopy(model), plan, calibration=stats, progress=False, sequential=sequential)
    torch.testing.assert_close(outputs(folded, inputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_whitened_relaxation_fits_the_outputs_better_than_the_plain_svd(family):
    model = build_tiny(family)
    stats = statistics_of(model)
    folds = {
        whiten: fold(copy.deepcopy(model), FoldPlan(4, [Tie(layers=[0, 1, 2, 3], rank=2, whiten=whiten)]),
                     calibration=stats, progress=False, sequential=False)
        for whiten in (False, True)
    }  # fmt: skip
    originals = family_of(model).layer_list(model)
    for path in family_of(model).shared_projections("all"):
        errors = {}
        for whiten, folded in folds.items():
            blocks = family_of(folded).layer_list(folded)
            errors[whiten] = sum(
                output_error(
                    linear_weight(originals[i].get_submodule(path)),
                    blocks[i].get_submodule(path).merged_weight(),
                    stats.gram(i, path),
                )
                for i in range(4)
            )
        assert errors[True] <= errors[False] * (1 + 1e-6), (path, errors)


def test_lstsq_without_calibration_data_is_refused():
    model = build_tiny("llama")
    with pytest.raises(LayerfoldError, match=r"least-squares ties and whitened tie relaxations need calibration"):
        fold(model, FoldPlan.cycle(4, 2, fit="lstsq", rank=2, whiten=True), progress=False)


def test_a_bad_fit_in_a_plan_file_names_the_field():
    with pytest.raises(LayerfoldError, match=r"operations\[0\] \(tie\)\.fit: must be one of mean, lstsq"):
        FoldPlan.from_dict({"num_layers": 4, "operations": [{"op": "tie", "layers": [0, 1], "fit": "median"}]})
