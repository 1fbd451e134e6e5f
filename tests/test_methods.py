"""Training-free methods on tiny random models: calibration statistics, Basis Sharing / whitened SVD,
ShortGPT and LaCo, the parameter budget, and save -> load round trips."""

import copy

import pytest
import torch
from conftest import FAMILY_NAMES, build_tiny, outputs, sample_inputs

import layerfold
from layerfold import FoldPlan, LayerfoldError
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration, collect_statistics, restricted_stack
from layerfold.core.families import family_of, linear_weight
from layerfold.methods import registry
from layerfold.methods.factorize import factor_plan
from layerfold.operations import Drop, Factor, Merge
from layerfold.operations.factor.decompose import decompose, whitening_factor
from layerfold.operations.factor.modules import BasisLinear
from layerfold.operations.merge.build import merge_blocks
from layerfold.core.store import fold_state
from layerfold.core.report import parameter_breakdown


def calibration_batches(count: int = 4, length: int = 24) -> list[dict]:
    return [sample_inputs(seed=100 + k, batch=2, length=length) for k in range(count)]


@pytest.fixture(scope="module")
def llama():
    model = build_tiny("llama")
    return model, Calibration(model, calibration_batches())


def test_gram_matrices_are_the_inputs_gram_and_whitening_is_their_cholesky_factor(family):
    model = build_tiny(family)
    batches = calibration_batches(count=6, length=48)  # 576 tokens: more than any input width
    layers = family_of(model).layer_list(model)
    projection = family_of(model).projections[-1]  # the MLP output projection: its own input
    captured = []
    handle = layers[2].get_submodule(projection).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured]).double()
    stats = collect_statistics(model, batches, progress=False)
    gram = stats.gram(2, projection)
    assert stats.tokens == rows.shape[0]
    torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    factor = whitening_factor(gram)
    assert torch.equal(factor, torch.tril(factor))
    # Exact up to the tiny diagonal added when ReLU leaves some inputs dead (OPT) and XᵀX is singular.
    torch.testing.assert_close(factor @ factor.T, gram, rtol=1e-9, atol=1e-6 * float(gram.diagonal().mean()))


def test_padding_tokens_do_not_count():
    model = build_tiny("bert")
    batch = sample_inputs(length=10)
    padded = {k: torch.cat([v, torch.zeros(2, 6, dtype=v.dtype)], dim=1) for k, v in batch.items()}
    padded["input_ids"][:, 10:] = 0
    plain = collect_statistics(model, [batch], progress=False)
    masked = collect_statistics(model, [padded], progress=False)
    assert masked.tokens == plain.tokens == 20
    key = (1, "intermediate.dense")
    torch.testing.assert_close(masked.grams[key], plain.grams[key], rtol=1e-4, atol=1e-4)


def test_a_singular_gram_matrix_gets_a_small_diagonal_and_a_note(capsys):
    x = torch.randn(3, 8, dtype=torch.float64)  # 3 tokens for 8 inputs: rank 3
    factor = whitening_factor(x.T @ x, "layer 0 q_proj")
    assert torch.isfinite(factor).all()
    assert "not positive definite" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_basis_sharing_at_full_rank_reproduces_the_original(family, group_size):
    model = build_tiny(family)
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    stats = collect_statistics(model, calibration_batches(), progress=False)
    fam = family_of(model)
    layers = fam.layer_list(model)
    factors = []
    for projection in fam.projections:
        out_features, in_features = linear_weight(layers[0].get_submodule(projection)).shape
        for start in range(0, 4, group_size):
            members = list(range(start, start + group_size))
            factors.append(Factor(members, projection, min(out_features * group_size, in_features)))
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan(4, factors), calibration=stats)
    assert sum(isinstance(m, BasisLinear) for m in folded.modules()) == 4 * len(fam.projections)
    assert (outputs(folded, inputs) - expected).abs().max().item() <= 1e-4


def test_a_shared_basis_is_one_tensor_used_by_every_layer_of_its_group(llama, tmp_path):
    model, calibration = llama
    plan = factor_plan(model, calibration.statistics(progress=False), Budget(0.8), group_size=2)
    folded = layerfold.fold(copy.deepcopy(model), plan, calibration=calibration.statistics())
    q0, q1 = (layer.self_attn.q_proj for layer in folded.model.layers[:2])
    assert isinstance(q0, BasisLinear) and q0.basis is q1.basis and q0.coefficients is not q1.coefficients
    names = [n for n, _ in folded.named_parameters()]
    assert sum(".lora" in n or "coefficients" in n for n in names) == len(plan.factors()) * 2 - sum(
        1 for f in plan.factors() if len(f.layers) == 1
    )


def test_whitening_beats_plain_svd_on_the_calibration_outputs():
    torch.manual_seed(0)
    weight = torch.randn(16, 32, dtype=torch.float64)
    x = torch.randn(500, 32, dtype=torch.float64) * torch.logspace(0, -3, 32, dtype=torch.float64)
    errors = {}
    for name, gram in (("plain", None), ("whitened", x.T @ x)):
        basis, (coefficients,) = decompose([weight], gram, layers=(0,), projection="p").truncate(4)
        errors[name] = (x @ (weight - coefficients @ basis).T).norm()
    assert errors["whitened"] < errors["plain"]


def test_basis_rows_and_coefficient_columns_are_balanced():
    torch.manual_seed(0)
    weights = [torch.randn(16, 32, dtype=torch.float64) * 50 for _ in range(2)]
    x = torch.randn(500, 32, dtype=torch.float64) * 30
    decomposition = decompose(weights, x.T @ x, layers=(0, 1), projection="p")
    basis, coefficients = decomposition.truncate(32)
    stacked = torch.cat(coefficients)
    torch.testing.assert_close(basis.pow(2).mean(1), stacked.pow(2).mean(0))  # same RMS per component
    for weight, coefficient in zip(weights, coefficients):
        torch.testing.assert_close(coefficient @ basis, weight)  # the product is unchanged


def test_block_influence_of_an_identity_block_is_zero():
    model = build_tiny("llama")
    block = model.model.layers[1]
    with torch.no_grad():  # both residual branches add zero: the block passes its input through
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    stats = collect_statistics(model, calibration_batches(), grams=False, progress=False)
    assert abs(stats.block_influence[1]) < 1e-6 and abs(stats.angular_distance[1]) < 1e-3
    assert min(stats.block_influence[i] for i in (0, 2, 3)) > 1e-3
    plan = registry.get("shortgpt").plan(model, Budget(0.75, blocks_only=True), Calibration(model, [sample_inputs()]))
    assert plan.dropped() == [1]


def test_restricted_stack_runs_only_the_chosen_layers_and_restores_the_model():
    model = build_tiny("gemma3_text")
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    dropped = layerfold.fold(copy.deepcopy(model), FoldPlan.from_groups([], drop=[0, 1], num_layers=4))
    with restricted_stack(model, [2, 3]), torch.no_grad():
        assert len(model.model.layers) == 2 and model.config.layer_types == ["sliding_attention", "full_attention"]
        # No KV cache here: the attention modules keep their original layer_idx.
        assert torch.equal(model(**inputs, use_cache=False).logits, outputs(dropped, inputs))
    assert len(model.model.layers) == 4 and torch.equal(outputs(model, inputs), expected)


def test_laco_merge_reserves_differences():
    blocks = [build_tiny("llama", seed=s).model.layers[0] for s in range(3)]
    expected = {
        name: p0 + (dict(blocks[1].named_parameters())[name] - p0) + (dict(blocks[2].named_parameters())[name] - p0)
        for name, p0 in ((n, p.detach().clone()) for n, p in blocks[0].named_parameters())
    }
    merge_blocks(blocks[0], blocks[1:])
    for name, param in blocks[0].named_parameters():
        torch.testing.assert_close(param.detach(), expected[name])


@pytest.mark.parametrize("method", ["basis", "svd", "shortgpt", "laco", "drop-even"])
@pytest.mark.parametrize("budget", [Budget(0.8), Budget(0.6, blocks_only=True)], ids=["keep", "keep-blocks"])
def test_parameter_counts_meet_the_budget(llama, method, budget):
    model, calibration = llama
    options = {"threshold": -1.0} if method == "laco" else {}
    folded = registry.build(registry.get(method), copy.deepcopy(model), budget, calibration, **options)
    before, after = parameter_breakdown(model), parameter_breakdown(folded)
    base = before["blocks"] if budget.blocks_only else before["total"]
    kept = (after["blocks"] if budget.blocks_only else after["total"]) / base
    block = before["blocks"] / 4
    slack = block / base if method in ("shortgpt", "laco", "drop-even") else 0.03
    assert budget.keep - slack <= kept <= budget.keep + (slack if method == "drop-even" else 1e-9), kept


@pytest.mark.parametrize("method", ["basis", "svd", "shortgpt", "laco"])
def test_save_load_round_trip(llama, method, tmp_path):
    model, calibration = llama
    options = {"threshold": -1.0} if method == "laco" else {}
    folded = registry.build(registry.get(method), copy.deepcopy(model), Budget(0.7), calibration, **options)
    layerfold.save(folded, tmp_path / method)
    loaded = layerfold.load(tmp_path / method)
    inputs = sample_inputs()
    assert torch.equal(outputs(loaded, inputs), outputs(folded, inputs))
    assert parameter_breakdown(loaded) == parameter_breakdown(folded)
    exported = layerfold.materialize(layerfold.load(tmp_path / method))
    assert (outputs(exported, inputs) - outputs(folded, inputs)).abs().max().item() < 1e-4


def laco_replayed(model, calibration, budget, serialise):
    """Fold with LaCo (every merge accepted), then fold the original again from the serialised plan; return the
    plan after checking that both models compute the same."""
    folded = registry.build(registry.get("laco"), copy.deepcopy(model), budget, calibration, threshold=-1.0)
    plan = fold_state(folded).plan
    replayed = layerfold.fold(copy.deepcopy(model), serialise(plan))
    inputs = sample_inputs()
    assert torch.equal(outputs(replayed, inputs), outputs(folded, inputs))
    return plan


def test_laco_plan_replays_on_the_original(llama):
    model, calibration = llama
    plan = laco_replayed(model, calibration, Budget(0.6), lambda p: FoldPlan.from_json(p.to_json()))
    assert plan.merges() and set(plan.dropped()) == {i for m in plan.merges() for i in m.layers}


def test_laco_threshold_that_rejects_every_merge_is_a_clear_error(llama):
    model, calibration = llama
    with pytest.raises(LayerfoldError, match="below the threshold"):
        registry.build(registry.get("laco"), copy.deepcopy(model), Budget(0.6), calibration, threshold=1.0)


def test_unreachable_budget_is_a_clear_error(llama):
    model, calibration = llama
    for method in ("basis", "svd", "shortgpt", "laco", "drop-even"):
        with pytest.raises(LayerfoldError, match="--keep 0.01 cannot be met"):
            registry.build(registry.get(method), copy.deepcopy(model), Budget(0.01), calibration)


@pytest.mark.parametrize(
    "factors, message",
    [
        ([{"op": "factor", "layers": [0], "projection": "self_attn.q_proj"}], "a factor operation needs rank"),
        ([{"op": "factor", "layers": [0], "projection": "self_attn.q_proj", "rank": 0}], "rank: must be a positive"),
        ([{"op": "factor", "layers": [9], "projection": "self_attn.q_proj", "rank": 2}], "out of range"),
        (
            [{"op": "factor", "layers": [0, 1], "projection": "mlp.up_proj", "rank": 2}] * 2,
            "already factorised by plan.operations[0]",
        ),
    ],
)
def test_bad_factor_plans_name_the_field(factors, message):
    with pytest.raises(LayerfoldError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FoldPlan.from_dict({"num_layers": 4, "operations": factors})


def test_factor_plan_checks_against_the_model():
    model = build_tiny("llama")
    with pytest.raises(LayerfoldError, match="not a projection of llama"):
        FoldPlan(4, [Factor([0], "attn.c_attn", 2)]).validate(model)
    with pytest.raises(LayerfoldError, match="at most 64"):
        FoldPlan(4, [Factor([0], "self_attn.q_proj", 65)]).validate(model)
    with pytest.raises(LayerfoldError, match="need calibration text"):
        layerfold.fold(model, FoldPlan(4, [Factor([0], "mlp.up_proj", 2)]))


def test_plan_with_factors_and_merges_round_trips():
    plan = FoldPlan(
        4,
        [Merge(into=2, layers=[3]), Factor([0, 1], "mlp.up_proj", 5), Drop([3])],
        provenance={"method": "basis", "keep": 0.8},
    )
    assert FoldPlan.from_json(plan.to_json()) == plan == FoldPlan.from_yaml(plan.to_yaml())
    with pytest.raises(LayerfoldError, match="merged away, so a drop must remove it"):
        FoldPlan(4, [Merge(into=2, layers=[3])]).check()
    # LaCo may merge an already merged layer again: then it is dropped, absorbed by the later merge.
    nested = [Merge(into=2, layers=[3]), Merge(into=1, layers=[2])]
    FoldPlan(4, [*nested, Drop([2, 3])]).check()
    with pytest.raises(LayerfoldError, match="no later merge absorbs it"):
        FoldPlan(4, [nested[0], Merge(into=0, layers=[3]), Drop([2, 3])]).check()


def test_laco_merges_into_merged_layers_on_a_deep_model():
    model = build_tiny("llama")
    model.model.layers.extend(copy.deepcopy(model.model.layers))  # 8 layers
    model.config.num_hidden_layers = 8
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    calibration = Calibration(model, calibration_batches())
    plan = laco_replayed(model, calibration, Budget(0.5, blocks_only=True), lambda p: FoldPlan.from_yaml(p.to_yaml()))
    assert any(m.into in plan.dropped() for m in plan.merges())  # a merged layer was merged again


def test_method_options_are_checked(llama):
    model, calibration = llama
    with pytest.raises(LayerfoldError, match="does not take --score"):
        registry.build(registry.get("basis"), model, Budget(0.8), calibration, score="angular")
    with pytest.raises(LayerfoldError, match="needs calibration data"):
        registry.build(registry.get("svd"), model, Budget(0.8), None)


def test_a_basis_above_break_even_rank_merges_for_long_inputs_and_computes_the_same():
    from layerfold.operations.factor.modules import SharedBasis

    torch.manual_seed(0)
    n_in, n_out = 24, 16  # break-even rank 24·16/40 = 9.6
    wide = BasisLinear(SharedBasis(torch.randn(12, n_in)), torch.randn(n_out, 12), None, transposed=False)
    narrow = BasisLinear(SharedBasis(torch.randn(6, n_in)), torch.randn(n_out, 6), None, transposed=False)
    # Above break-even: one token stays factorised (forming W costs more), many tokens merge.
    assert not wide.merges_for(1) and wide.merges_for(512)
    # Below it the factors are always cheaper.
    assert not any(narrow.merges_for(n) for n in (1, 512, 10**6))
    for layer in (wide, narrow):
        for tokens in (1, 512):
            x = torch.randn(1, tokens, n_in)
            y = layer(x)
            assert torch.allclose(y, x @ (layer.coefficients @ layer.basis.weight).T, atol=1e-4)
            y.sum().backward()  # both paths train the basis and the coefficients
            assert layer.basis.weight.grad is not None and layer.coefficients.grad is not None
            layer.basis.weight.grad = layer.coefficients.grad = None
