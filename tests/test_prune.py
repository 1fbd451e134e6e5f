"""Width pruning (prune-channels, prune-heads and the prune method) on tiny models of every family: pruning
nothing reproduces the original, a duplicated channel or head is compensated exactly, grouped-query
attention keeps one repeat count, uniform folds export as the plain architecture with smaller widths (narrower
layers of a non-uniform fold are padded with exact zeros), counts meet the budget, save → load and streamed
folds are bit-identical, and bad input gives one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    FAMILY_NAMES,
    assert_same_checkpoint,
    build_tiny,
    in_memory_fold,
    outputs,
    sample_inputs,
    save_tiny_with_tokenizer,
)

import layerfold
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration, calibration_batches, collect_statistics
from layerfold.cli.commands import main
from layerfold.core.errors import LayerfoldError
from layerfold.core.families import family_of, linear_weight
from layerfold.folding.in_memory import fold
from layerfold.checkpoints.folded import load_tokenizer
from layerfold.methods import registry
from layerfold.methods.importance import SCORES, Units
from layerfold.operations import PruneChannels, PruneHeads
from layerfold.operations.geometry import NO_HEAD_PRUNING, attention_layout, channel_width, mlp_paths
from layerfold.operations.plan import FoldPlan
from layerfold.core.report import parameter_breakdown
from layerfold.folding.streamed import stream_fold

HEAD_FAMILIES = [name for name in FAMILY_NAMES if name not in NO_HEAD_PRUNING]


def batches(count: int = 4, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    return [
        {"input_ids": torch.randint(3, 128, (2, length), generator=generator),
         "attention_mask": torch.ones(2, length, dtype=torch.long)}
        for _ in range(count)
    ]  # fmt: skip


def statistics_of(model):
    return collect_statistics(model, batches(16, 32), progress=False)  # more tokens than channels


def geometry(model):
    family = family_of(model)
    block = family.layer_list(model)[0]
    layout = None if family.model_type in NO_HEAD_PRUNING else attention_layout(family, block, "test")
    return family, channel_width(block, family), layout


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_pruning_nothing_reproduces_the_original(family_name):
    model = build_tiny(family_name)
    reference = outputs(model, sample_inputs())
    family, width, layout = geometry(model)
    operations = [PruneChannels(layers=[0, 1, 2, 3], keep=[list(range(width))] * 4)]
    if layout is not None:
        operations.append(PruneHeads(layers=[0, 3], keep=[list(range(layout.heads))] * 2))
    folded = fold(build_tiny(family_name), FoldPlan(4, operations), calibration=statistics_of(model), progress=False)
    torch.testing.assert_close(outputs(folded, sample_inputs()), reference, rtol=1e-5, atol=1e-5)


def _duplicate_channel(model, layer: int, source: int, copy: int) -> None:
    """Make MLP channel ``copy`` of ``layer`` compute exactly what channel ``source`` computes."""
    family = family_of(model)
    block = family.layer_list(model)[layer]
    producers, _ = mlp_paths(family)
    width = channel_width(block, family)
    with torch.no_grad():
        for path in producers:
            module = block.get_submodule(path)
            weight = linear_weight(module)
            for half in range(weight.shape[0] // width):  # Phi-3's gate_up: both halves
                weight[half * width + copy] = weight[half * width + source]
                if module.bias is not None:
                    module.bias[half * width + copy] = module.bias[half * width + source]


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_a_duplicated_channel_is_compensated_exactly(family_name):
    model = build_tiny(family_name)
    _duplicate_channel(model, 1, source=3, copy=7)
    reference = outputs(model, sample_inputs())
    _, width, _ = geometry(model)
    plan = FoldPlan(4, [PruneChannels(layers=[1], keep=[[c for c in range(width) if c != 7]])])
    statistics = statistics_of(model)
    compensated = fold(_copy(model), plan, calibration=statistics, progress=False)
    error = (outputs(compensated, sample_inputs()) - reference).abs().max()
    assert error < 1e-3 * reference.abs().max()
    plain = fold(_copy(model), FoldPlan.from_dict({**plan.to_dict(), "operations": [
        {**plan.operations[0].to_dict(), "compensate": False}]}), progress=False)  # fmt: skip
    assert (outputs(plain, sample_inputs()) - reference).abs().max() > 10 * error  # the cut alone is not exact


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("family_name", ["llama", "bert", "opt"])
def test_a_duplicated_head_is_compensated_exactly(family_name):
    """Two query heads of one key/value group (llama: groups of 2) with the same q rows attend alike; the o
    columns of the removed one fold into the other."""
    model = build_tiny(family_name)
    family, _, layout = geometry(model)
    block = family.layer_list(model)[2]
    d = layout.head_dim
    with torch.no_grad():
        q = block.get_submodule(layout.q)
        q.weight[d : 2 * d] = q.weight[:d]
        if q.bias is not None:
            q.bias[d : 2 * d] = q.bias[:d]
        if layout.group_size == 1:  # without grouping the heads' keys and values must agree too
            for path in (layout.k, layout.v):
                module = block.get_submodule(path)
                module.weight[d : 2 * d] = module.weight[:d]
                if module.bias is not None:
                    module.bias[d : 2 * d] = module.bias[:d]
    keep = [0, *range(2, layout.heads)] if layout.group_size == 1 else [0, 2]  # GQA: one per group
    if layout.group_size != 1:  # head 3 mirrors head 2 as head 1 mirrors head 0
        with torch.no_grad():
            q.weight[3 * d : 4 * d] = q.weight[2 * d : 3 * d]
    reference = outputs(model, sample_inputs())
    plan = FoldPlan(4, [PruneHeads(layers=[2], keep=[keep])])
    statistics = statistics_of(model)
    folded = fold(_copy(model), plan, calibration=statistics, progress=False)
    error = (outputs(folded, sample_inputs()) - reference).abs().max()
    assert error < 3e-3 * reference.abs().max()  # the ridge's pull, through layer norms
    cut = PruneHeads(layers=[2], keep=[keep], compensate=False)
    plain = fold(_copy(model), FoldPlan(4, [cut]), progress=False)
    assert (outputs(plain, sample_inputs()) - reference).abs().max() > 10 * error
    attention = family.layer_list(folded)[2].get_submodule(layout.q.rpartition(".")[0])
    if hasattr(attention, "num_key_value_groups"):
        assert attention.num_key_value_groups == len(keep) // 2


def test_grouped_query_attention_keeps_one_repeat_count():
    model = build_tiny("llama")  # 4 query heads over 2 key/value heads
    with pytest.raises(LayerfoldError, match="same number of query heads in every kept key/value group"):
        FoldPlan(4, [PruneHeads(layers=[0], keep=[[0, 1, 2]])]).validate(model)
    folded = fold(build_tiny("llama"), FoldPlan(4, [PruneHeads(layers=[0], keep=[[2, 3]])]), progress=False,
                  calibration=statistics_of(model))  # fmt: skip
    attention = folded.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (32, 16)  # one group of two
    assert attention.num_key_value_groups == 2
    assert torch.isfinite(outputs(folded, sample_inputs())).all()


@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gemma3_text", "phi3", "gpt2", "bert"])
def test_a_uniform_fold_exports_as_the_smaller_plain_architecture(family_name, tmp_path):
    model = build_tiny(family_name)
    method = registry.get("prune")
    folded = registry.build(method, _copy(model), Budget(0.6, blocks_only=True), Calibration(model, batches()),
                            uniform=True, multiple_of=8)  # fmt: skip
    assert parameter_breakdown(folded)["blocks"] <= 0.6 * parameter_breakdown(model)["blocks"]
    layerfold.save(folded, tmp_path / "folded")
    layerfold.export(tmp_path / "folded", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type  # loads with transformers alone
    _, width, layout = geometry(folded)
    assert width < channel_width(family_of(model).layer_list(model)[0], family_of(model)) and width % 8 == 0
    plain = layerfold.load_source(tmp_path / "plain")
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(outputs(plain, sample_inputs()), outputs(folded, sample_inputs()), rtol=1e-4, atol=1e-4)
    if family_name in ("llama", "qwen3", "gemma3_text") and layout.heads < model.config.num_attention_heads:
        assert config["num_attention_heads"] == layout.heads and config["head_dim"] == layout.head_dim


@pytest.mark.parametrize("family_name", ["llama", "bert", "phi3"])
def test_a_non_uniform_fold_exports_padded_with_exact_zeros(family_name, tmp_path):
    model = build_tiny(family_name)
    _, width, layout = geometry(model)
    operations = [PruneChannels(layers=[0, 2], keep=[list(range(0, width, 2)), list(range(5, width))])]
    if layout is not None:
        operations.append(PruneHeads(layers=[1], keep=[[0, 1] if layout.group_size == 2 else [1, 3]]))
    folded = fold(_copy(model), FoldPlan(4, operations), calibration=statistics_of(model), progress=False)
    layerfold.save(folded, tmp_path / "folded")
    loaded = layerfold.load(tmp_path / "folded")
    assert torch.equal(outputs(loaded, sample_inputs()), outputs(folded, sample_inputs()))
    layerfold.export(tmp_path / "folded", tmp_path / "plain")
    plain = layerfold.load_source(tmp_path / "plain")
    torch.testing.assert_close(outputs(plain, sample_inputs()), outputs(folded, sample_inputs()), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny"), names=("llama", "bert", "phi3"))
    (root / "text.txt").write_text("\n\n".join(f"Paragraph {i} says something about folding." * 6 for i in range(40)))
    return root


@pytest.mark.parametrize("family_name", ["llama", "bert", "phi3"])
def test_a_streamed_pruned_fold_is_bit_identical(with_tokenizer, family_name, tmp_path):
    source = with_tokenizer / family_name
    tokenizer = load_tokenizer(source)

    def calibration(model):
        return calibration_batches(model, tokenizer, with_tokenizer / "text.txt", tokens=1024, window=128)

    model = layerfold.load_source(source)
    _, width, layout = geometry(model)
    operations = [PruneChannels(layers=[0, 3], keep=[list(range(1, width, 3)), list(range(width - 9))])]
    if layout is not None:
        operations.append(PruneHeads(layers=[2], keep=[list(range(layout.heads // 2))]))
    plan = FoldPlan(4, operations)
    stream_fold(source, tmp_path / "streamed", plan, calibration=calibration, progress=False)
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory", calibration))


def test_the_sequential_fit_refits_pruned_layers():
    model = build_tiny("llama")
    statistics = statistics_of(model)
    plan = FoldPlan(4, [PruneChannels(layers=[0, 1, 2, 3], keep=[list(range(0, 128, 2))] * 4)])
    plain = fold(_copy(model), FoldPlan.from_dict(plan.to_dict()), calibration=statistics, progress=False)
    refitted = fold(_copy(model), FoldPlan.from_dict(plan.to_dict()), calibration=statistics, progress=False,
                    sequential=True)  # fmt: skip
    a, b = plain.model.layers[3].mlp.down_proj.weight, refitted.model.layers[3].mlp.down_proj.weight
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.isfinite(outputs(refitted, sample_inputs())).all()


@pytest.mark.parametrize("importance", sorted(SCORES))
@pytest.mark.parametrize("family_name", ["llama", "bert"])
def test_every_importance_score_ranks_a_dead_channel_last(importance, family_name):
    """A channel whose producing rows and reading column are zero changes nothing: every score puts it lowest."""
    model = build_tiny(family_name)
    family, width, _ = geometry(model)
    producers, reader = mlp_paths(family)
    block = family.layer_list(model)[1]
    with torch.no_grad():
        for path in producers:
            linear_weight(block.get_submodule(path))[5] = 0
            if block.get_submodule(path).bias is not None:
                block.get_submodule(path).bias[5] = 0
        linear_weight(block.get_submodule(reader))[:, 5] = 0
    calibration = Calibration(model, batches(), progress=False, mask_token_id=4)
    scores = SCORES[importance](model, calibration, Units((1, 2), reader, 1, producers))
    assert sorted(scores) == [1, 2] and scores[1].shape == (width,)
    assert float(scores[1][5]) == pytest.approx(float(scores[1].min()), abs=1e-12)
    assert float(scores[1].max()) > 0


@pytest.mark.parametrize("keep", [0.8, 0.6, 0.45])
@pytest.mark.parametrize("options", [{}, {"target": "mlp", "min_keep": 0.1}, {"uniform": True, "multiple_of": 8}, {"depth": 0.5}])
def test_the_method_meets_the_budget(keep, options):
    model = build_tiny("llama")
    budget = Budget(keep, blocks_only=True)
    plan = registry.get("prune").plan(model, budget, Calibration(model, batches(), progress=False), **options)
    folded = fold(_copy(model), plan, calibration=statistics_of(model), progress=False)
    kept = parameter_breakdown(folded)["blocks"] / parameter_breakdown(model)["blocks"]
    assert keep - 0.1 < kept <= keep
    if options.get("depth") and keep < 0.5:  # half of the saving is more than a block (a quarter of them)
        assert plan.dropped()


def test_the_planner_tries_width():
    from layerfold.methods.planner import parse_allow

    assert "width" in parse_allow(None)
    kinds = [c.kind for c in registry.get("prune").candidates(None)]
    assert "width" in kinds and "drop+width" in kinds
    for candidate in registry.get("prune").candidates(None):
        registry.get("prune").make_options(candidate.options)  # every candidate's options are the method's


@pytest.mark.parametrize(
    "operations, message",
    [
        ([PruneChannels(layers=[0], keep=[[]])], "layer 0 would lose every channel; keep at least one"),
        ([PruneChannels(layers=[0], keep=[[0, 500]])], "layer 0 has 128 channels; index 500 is out of range"),
        ([PruneChannels(layers=[0, 1], keep=[[1]])], "one list of kept channels per listed layer"),
        ([PruneChannels(layers=[0], keep=[[1, 1]])], "layer 0 lists a channel twice"),
        ([PruneHeads(layers=[0], keep=[[0, 1, 3]])], "same number of query heads in every kept key/value group"),
        ([PruneHeads(layers=[1], keep=[[7]])], "layer 1 has 4 heads; index 7 is out of range"),
        ([PruneChannels(layers=[0], keep=[[1]]), PruneChannels(layers=[0], keep=[[2]])], "layer 0 is already pruned"),
    ],
)
def test_bad_plans_give_one_line(operations, message):
    with pytest.raises(LayerfoldError, match=message):
        FoldPlan(4, operations).validate(build_tiny("llama"))


def test_plan_rules_against_other_operations():
    from layerfold.operations import Drop, Factor, Tie

    model = build_tiny("llama")
    prune = PruneChannels(layers=[1], keep=[[0, 1]])
    with pytest.raises(LayerfoldError, match="layer 1's mlp is tied"):
        FoldPlan(4, [Tie(layers=[1, 2]), prune]).validate(model)
    FoldPlan(4, [Tie(layers=[1, 2], share="attention"), prune]).validate(model)  # narrow MLPs, shared attention
    with pytest.raises(LayerfoldError, match="is also dropped"):
        FoldPlan(4, [prune, Drop([1])]).validate(model)
    with pytest.raises(LayerfoldError, match="mlp.down_proj is also factorised"):
        FoldPlan(4, [Factor(layers=[1], projection="mlp.down_proj", rank=4), prune]).validate(model)
    with pytest.raises(LayerfoldError, match="prune-heads cannot prune gpt2: GPT-2 fuses q, k and v"):
        FoldPlan(4, [PruneHeads(layers=[0], keep=[[0]])]).validate(build_tiny("gpt2"))


def test_a_pruned_fold_with_shared_attention_runs_and_round_trips(tmp_path):
    from layerfold.operations import Tie

    model = build_tiny("llama")
    plan = FoldPlan(4, [Tie(layers=[1, 2], share="attention", rank=2),
                        PruneChannels(layers=[0, 1, 2, 3], keep=[list(range(0, 128, 2))] * 4)])  # fmt: skip
    folded = fold(_copy(model), plan, calibration=statistics_of(model), progress=False)
    layerfold.save(folded, tmp_path / "folded")
    assert torch.equal(outputs(layerfold.load(tmp_path / "folded"), sample_inputs()), outputs(folded, sample_inputs()))
    assert "MLP channels pruned in 4 layers (64 kept, compensated)" in plan.describe()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--importance", "loudness"], "--importance must be one of magnitude, activation, fisher"),
        (["--target", "embeddings"], "--target must be one of mlp, attention, both"),
        (["--min-keep", "0"], "--min-keep must be a fraction in (0, 1]"),
        (["--target", "attention", "--keep-blocks", "0.3"], "cannot be met: pruning attention width"),
    ],
)
def test_bad_method_options_give_one_line(capsys, with_tokenizer, tmp_path, args, message):
    arguments = [str(with_tokenizer / "llama"), "--method", "prune", "--calib", str(with_tokenizer / "text.txt"),
                 "--out", str(tmp_path / "out"), *args]  # fmt: skip
    if "--keep-blocks" not in args:
        arguments += ["--keep-blocks", "0.7"]
    code = main(["fold", *arguments])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("layerfold: error:") and message in err[-1]
    assert not (tmp_path / "out").exists()


def test_cli_fold_prune_then_export(capsys, with_tokenizer, tmp_path):
    source = with_tokenizer / "llama"
    code = main(["fold", str(source), "--method", "prune", "--keep-blocks", "0.7", "--uniform", "--multiple-of", "8",
                 "--calib", str(with_tokenizer / "text.txt"), "--out", str(tmp_path / "folded"), "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keep_blocks"] <= 0.7
    assert main(["export", str(tmp_path / "folded"), "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["model_type"] == "llama" and plain["intermediate_size"] < 128
