import copy

import pytest
import torch
from conftest import build_tiny, outputs, sample_inputs

import layerfold
from layerfold import FoldPlan, LayerfoldError
from layerfold.core.families import family_of
from layerfold.operations.tie.modules import TiedLinear


def test_identity_plan_is_bit_identical(family):
    model = build_tiny(family)
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan.identity(4))
    assert torch.equal(outputs(folded, inputs), expected)


@pytest.mark.parametrize(
    "plan",
    [
        FoldPlan.cycle(4, 2, rank="full"),
        FoldPlan.sequence(4, 2, rank="full", fit="lower"),
        FoldPlan.cycle(4, 1, rank="full", fit="stepwise"),
        FoldPlan.middle_cycle(4, 3, rank="full", share="attention"),
        FoldPlan.cycle(4, 2, rank="full", share="mlp", share_bias=True),
    ],
    ids=["cycle", "sequence-lower", "one-block-stepwise", "middle-attention", "mlp-shared-bias"],
)
def test_full_rank_tying_reproduces_the_original(family, plan):
    model = build_tiny(family)
    inputs = sample_inputs()
    expected = outputs(model, inputs)
    folded = layerfold.fold(copy.deepcopy(model), plan, progress=False)
    assert any(isinstance(m, TiedLinear) for m in folded.modules())
    assert (outputs(folded, inputs) - expected).abs().max().item() <= 1e-4


def test_tied_weights_are_held_once(family):
    model = build_tiny(family)
    before = layerfold.unique_parameters(model)
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan.cycle(4, 2), progress=False)
    after = layerfold.unique_parameters(folded)
    blocks = family_of(model).layer_list(model)
    projection_params = sum(blocks[0].get_submodule(p).weight.numel() for p in family_of(model).projections)
    # Two of the four layers' projection weights are gone (biases stay per layer).
    assert before - after == 2 * projection_params
    # A shared weight is one Parameter object, reached from every layer of its group.
    layers = family_of(folded).layer_list(folded)
    path = family_of(folded).projections[0]
    assert layers[0].get_submodule(path).shared.weight is layers[2].get_submodule(path).shared.weight
    names = [n for n, _ in folded.named_parameters()]
    assert len(names) == len(set(names))


def test_low_rank_relaxation_is_the_truncated_svd(family):
    model = build_tiny(family)
    plan = FoldPlan.cycle(4, 2, rank=3)
    fam = family_of(model)
    path = fam.projections[0]
    original = fam.layer_list(model)[2].get_submodule(path)
    original_weight = layerfold.core.families.linear_weight(original).detach().clone()
    folded = layerfold.fold(copy.deepcopy(model), plan, progress=False)
    tied = fam.layer_list(folded)[2].get_submodule(path)
    delta = original_weight - (tied.shared.weight.t() if tied.transposed else tied.shared.weight)
    s = torch.linalg.svdvals(delta.double())
    residual = torch.linalg.matrix_norm((original_weight - tied.merged_weight()).double())
    # Eckart-Young: the best rank-3 approximation leaves exactly the tail of the spectrum.
    assert residual.item() == pytest.approx(s[3:].square().sum().sqrt().item(), rel=1e-4)


def test_full_rank_generate_gives_identical_tokens(decoder_family):
    model = build_tiny(decoder_family)
    prompt = sample_inputs(batch=1, length=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(**prompt, **settings)
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan.cycle(4, 2, rank="full"), progress=False)
    assert torch.equal(folded.generate(**prompt, **settings), expected)


def test_dropping_layers_renumbers_the_cache(decoder_family):
    model = build_tiny(decoder_family)
    plan = FoldPlan.from_groups([[0, 3]], drop=[1], num_layers=4, rank=2)
    folded = layerfold.fold(copy.deepcopy(model), plan, progress=False)
    assert folded.config.num_hidden_layers == 3
    assert len(family_of(folded).layer_list(folded)) == 3
    indices = [m.layer_idx for m in folded.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(indices)) == [0, 1, 2]
    layer_types = getattr(folded.config, "layer_types", None)
    if layer_types is not None:
        original_types = model.config.layer_types
        assert list(layer_types) == [original_types[i] for i in (0, 2, 3)]
    prompt = sample_inputs(batch=1, length=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = folded.generate(**prompt, use_cache=True, **settings)
    without_cache = folded.generate(**prompt, use_cache=False, **settings)
    assert torch.equal(with_cache, without_cache)


def test_dropped_model_matches_the_original_without_those_blocks(family):
    model = build_tiny(family)
    inputs = sample_inputs()
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan.from_groups([], drop=[1, 2], num_layers=4), progress=False)
    reference = copy.deepcopy(model)
    fam = family_of(reference)
    fam.set_layer_list(reference, torch.nn.ModuleList([fam.layer_list(reference)[i] for i in (0, 3)]))
    for position, block in enumerate(fam.layer_list(reference)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    reference.config.num_hidden_layers = 2
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [model.config.layer_types[i] for i in (0, 3)]
    assert torch.equal(outputs(folded, inputs), outputs(reference, inputs))


def test_backward_reaches_shared_weights_and_relaxations(family):
    model = build_tiny(family)
    folded = layerfold.fold(copy.deepcopy(model), FoldPlan.cycle(4, 2, rank=2), progress=False).train()
    result = folded(**sample_inputs())
    value = result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state
    value.pow(2).mean().backward()
    tied = [m for m in folded.modules() if isinstance(m, TiedLinear)]
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for m in tied)
    assert all(m.shared.weight.grad is not None and m.shared.weight.grad.abs().sum() > 0 for m in tied)


@pytest.mark.parametrize(
    "plan, message",
    [
        (FoldPlan.cycle(6, 3), r"plan.num_layers: the plan is for 6 layers but the model has 4"),
        (FoldPlan.cycle(4, 2, rank=65), r"\(tie\).rank: rank 65 is larger than .* allows"),
        (FoldPlan.cycle(4, 2, rank={"nonsense": 2}), r"\(tie\).rank\['nonsense'\]: unknown projection"),
        (FoldPlan.from_groups([[0, 7]], num_layers=4), r"\(tie\).layers: layer 7 is out of range"),
    ],
)
def test_plans_that_do_not_fit_the_model_are_rejected(family, plan, message):
    model = build_tiny(family)
    with pytest.raises(LayerfoldError, match=message):
        layerfold.fold(model, plan)


def test_folding_twice_is_refused():
    model = layerfold.fold(build_tiny("llama"), FoldPlan.cycle(4, 2), progress=False)
    with pytest.raises(LayerfoldError, match="already folded"):
        layerfold.fold(model, FoldPlan.cycle(4, 2))


def test_unsupported_architecture_names_model_type_and_supported_list():
    import transformers as T

    model = T.T5Model(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(LayerfoldError, match=r"unsupported architecture: model type 't5' \(supported: bert, .*llama"):
        layerfold.fold(model, FoldPlan.cycle(2, 1))
