"""Analysis, the plan search and the analyze / plan / compress commands, on tiny models with a real tokenizer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import build_tiny, sample_inputs, save_tiny_with_tokenizer

from layerfold.analysis.measures import (
    Analysis,
    GatedStack,
    analysis_of,
    cluster,
    output_similarity,
    train_gates,
    weight_similarity,
)
from layerfold.core.budget import Budget
from layerfold.cli.commands import main
from layerfold.engine.calibrate import Calibration
from layerfold.jobs.compress import plan_for_budget, prepare, run_analysis
from layerfold.jobs.demo import pydoc_paragraphs
from layerfold.core.errors import LayerfoldError
from layerfold.core.families import family_of
from layerfold.folding.in_memory import fold
from layerfold.checkpoints.folded import load
from layerfold.methods import registry
from layerfold.operations.plan import FoldPlan
from layerfold.methods.planner import Proxy, candidates, search
from layerfold.core.report import parameter_breakdown

TWINS = (1, 2)  # in the "twins" models, block 2 is an exact copy of block 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("plan"))
    (root / "text.txt").write_text("\n\n".join(pydoc_paragraphs(400)))
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "bert")
    for name in ("llama", "bert"):
        model = (AutoModelForCausalLM if name == "llama" else AutoModel).from_pretrained(root / name)
        layers = family_of(model).layer_list(model)
        layers[TWINS[1]].load_state_dict(layers[TWINS[0]].state_dict())
        model.save_pretrained(root / f"{name}-twins")
        tokenizer.save_pretrained(root / f"{name}-twins")
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module", params=["llama", "bert"])
def twins(request, saved):
    """Analysis and tie-only search (3 unique blocks of 4) of a model whose blocks 1 and 2 are identical."""
    prepared = prepare(saved / f"{request.param}-twins", saved / "text.txt", tokens=2048, window=256)
    return plan_for_budget(prepared, Budget(0.8, blocks_only=True), allow="tie", gate_steps=4, progress=False)


# ---- the measurements -----------------------------------------------------------------------------------------
def test_analysis_reports_identical_blocks_as_identical(twins):
    analysis, _ = twins
    i, j = TWINS
    for path, distance in analysis.weight_distance.items():
        assert distance[i][j] == pytest.approx(0.0, abs=1e-6), path
        assert analysis.shared_energy[path][i][j] == pytest.approx(1.0, abs=1e-5), path
        others = [distance[a][b] for a in range(4) for b in range(a + 1, 4) if (a, b) != TWINS]
        assert min(others) > 0.3, path
    assert analysis.most_similar_pairs(1)[0]["layers"] == list(TWINS)
    assert np.allclose(np.diag(analysis.output_cka), 1.0, atol=1e-4)
    assert np.allclose(np.diag(analysis.gradient_match), 1.0, atol=1e-4)
    assert np.allclose(analysis.gradient_match, np.array(analysis.gradient_match).T, atol=1e-6)
    # The analysis round-trips through JSON.
    assert Analysis.from_dict(json.loads(json.dumps(analysis.to_dict()))).to_dict() == analysis.to_dict()


def test_output_similarity_of_equal_and_scaled_outputs():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    outputs = torch.stack([x, 3.0 * x, torch.randn(64, 16)])
    cosine, cka = output_similarity(outputs)
    assert cosine[0, 1] == pytest.approx(1.0, abs=1e-5) and cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert cka[0, 2] < 0.5 and abs(cosine[0, 2]) < 0.3


def test_shared_energy_is_below_one_for_different_weights():
    model = build_tiny("llama")
    distances, energies = weight_similarity(model, energy_window=1, progress=False)
    for path, energy in energies.items():
        assert np.all(np.diag(energy) == 1.0)
        assert np.all(energy[[0, 1, 2], [1, 2, 3]] < 0.999), path
        assert np.isnan(energy[0, 3])  # outside the window: not measured
        assert np.all(distances[path][[0, 1, 2], [1, 2, 3]] > 0.5)


def test_gates_start_as_the_model_and_shrink_most_for_a_useless_block():
    model = build_tiny("llama")
    batch = {"input_ids": torch.randint(3, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        reference = model.base_model(**batch).last_hidden_state
        gated = GatedStack(model)
        assert torch.allclose(gated(**batch), reference, atol=1e-6)  # all gates 1: the model as it is
        gated.remove()
        block = family_of(model).layer_list(model)[2]
        block.self_attn.o_proj.weight.mul_(1e-3)
        block.mlp.down_proj.weight.mul_(1e-3)
    gates = train_gates(model, [batch], steps=12, progress=False)
    assert int(np.argmin(gates)) == 2, gates
    assert gates[2] < min(gates[i] for i in (0, 1, 3)) - 0.1, gates
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("progress", [True, False])
def test_gate_training_shows_one_bar_or_nothing_and_never_trainers_summary(capsys, progress):
    model = build_tiny("llama")
    batch = {"input_ids": torch.randint(3, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    train_gates(model, [batch], steps=3, progress=progress)
    out, err = capsys.readouterr()
    assert out == "" and "train_runtime" not in err
    assert ("block gates: 100%" in err) is progress


def test_cluster_groups_the_most_similar_layers_first():
    similarity = np.array([[1, 0.1, 0.2, 0.1], [0.1, 1, 0.9, 0.3], [0.2, 0.9, 1, 0.1], [0.1, 0.3, 0.1, 1]])
    assert cluster(similarity, range(4), 3) == [[0], [1, 2], [3]]
    assert cluster(similarity, range(4), 1) == [[0, 1, 2, 3]]


# ---- the methods that plan from the analysis -----------------------------------------------------------------
def hand_made_analysis(num_layers: int = 4) -> Analysis:
    """Gates 0.9, 0.1, 0.5, 0.3; weights: 1 and 2 the closest, then 0 and 3; outputs: 0 and 3, then 0 and 1; no
    gradients."""
    distance = np.full((num_layers, num_layers), 0.8)
    distance[1, 2] = distance[2, 1] = 0.1
    distance[0, 3] = distance[3, 0] = 0.3
    np.fill_diagonal(distance, 0.0)
    cka = np.eye(num_layers)
    cka[0, 3] = cka[3, 0] = 0.9
    cka[0, 1] = cka[1, 0] = 0.5
    return Analysis(
        model_type="llama", num_layers=num_layers, tokens=1, block_influence=[0.4, 0.3, 0.2, 0.1],
        angular_distance=[0.1, 0.2, 0.4, 0.3], output_cosine=cka.tolist(), output_cka=cka.tolist(),
        weight_distance={"q": distance.tolist()}, shared_energy={"q": (1 - distance).tolist()}, rank_fraction=0.25,
        gates=[0.9, 0.1, 0.5, 0.3],
    )  # fmt: skip


def test_analysed_methods_plan_from_the_analysis_they_are_given():
    model = build_tiny("llama")
    analysis, half = hand_made_analysis(), Budget(0.5, blocks_only=True)
    calibration = Calibration(model, [])  # not measured: the analysis is given

    def plan(name, **options):
        return registry.get(name).plan(model, half, calibration, analysis, **options)

    assert plan("drop-lowest").dropped() == [1, 3]  # the two smallest gates
    assert plan("drop-lowest", score="influence").dropped() == [2, 3]
    assert plan("drop-lowest", score="angular").dropped() == [0, 1]
    assert [op.layers for op in plan("tie-similar").ties()] == [[0, 3], [1, 2]]
    assert [op.layers for op in plan("tie-similar", similarity="outputs").ties()] == [[0, 1, 3]]
    assert {op.rank for op in plan("tie-similar", rank=4).ties()} == {4}
    # FoldGPT: the smallest gate goes (half of the two blocks' saving), the rest tie by weights (no gradients).
    foldgpt = plan("foldgpt")
    assert foldgpt.dropped() == [1] and [op.layers for op in foldgpt.ties()] == [[0, 3]]
    with pytest.raises(LayerfoldError, match="no gradient matching"):
        plan("tie-similar", similarity="gradients")
    with pytest.raises(LayerfoldError, match="--score must be one of"):
        plan("drop-lowest", score="size")


def test_an_analysed_method_measures_the_analysis_once_and_leaves_the_rest_as_it_was():
    model = build_tiny("bert")  # dropout: a model left in training mode would answer differently each time
    calibration = Calibration(model, [sample_inputs(seed=s, batch=2, length=16) for s in range(2)])
    state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = registry.get("drop-lowest").plan(model, Budget(0.5, blocks_only=True), calibration)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], numpy_state)
    assert not model.training
    analysis = analysis_of(calibration)
    assert analysis is analysis_of(calibration) and analysis.gates and analysis.gradient_match
    assert first.dropped() == sorted(sorted(range(4), key=lambda i: analysis.gates[i])[:2])


def test_the_planner_tries_the_registered_methods_candidates_and_nothing_else(saved, monkeypatch):
    prepared = prepare(saved / "llama", saved / "text.txt", tokens=2048, window=256)
    analysis = run_analysis(prepared, gate_steps=2, progress=False)
    proxy = Proxy(prepared.model, prepared.proxy_batches)
    budget = Budget(0.5, blocks_only=True)

    def tried(allow):
        result = search(prepared.model, prepared.calibration, analysis, budget, proxy, allow=allow, progress=False)
        return [c.name for c in result.candidates + result.rejected]

    expected = [c.label for _, c in candidates(analysis, ("drop",))]
    assert sorted(tried("drop")) == sorted(expected) and len(expected) == 5
    # A method registered with a candidate is tried; its plan is its own.
    keep_last = registry.Method(
        "keep-last", "keep the last K blocks", lambda model, budget, calibration, options: FoldPlan.from_groups(
            [], drop=range(4 - registry.unique_blocks_for(model, budget)), num_layers=4),
        candidates=lambda analysis: [registry.Candidate("drop: the first blocks", "drop")],
    )  # fmt: skip
    monkeypatch.setitem(registry.REGISTRY, "keep-last", keep_last)
    assert "drop: the first blocks" in tried("drop")
    assert "drop: the first blocks" not in tried("tie")
    monkeypatch.delitem(registry.REGISTRY, "keep-last")
    assert "drop: the first blocks" not in tried("drop")


# ---- the search -----------------------------------------------------------------------------------------------
def test_planner_ties_identical_blocks_first(twins):
    _, result = twins
    best = result.best
    # Tying two identical blocks loses nothing: the proxy equals the original's. (With least-squares ties, the
    # tiny models' other pairs come within 1e-5 of it too, so the chosen plan may be another lossless one.)
    twins_tie = [c for c in result.candidates if [op.layers for op in c.plan.ties()] == [list(TWINS)]]
    assert twins_tie and twins_tie[0].proxy == pytest.approx(result.original_proxy, abs=1e-5), result.explanation()
    assert best.proxy == pytest.approx(result.original_proxy, abs=5e-5)
    assert result.candidates[0].proxy == best.proxy and len(result.candidates) >= 3
    assert "Chose" in result.explanation()


@pytest.mark.parametrize(
    # The tiny models' 30k-token embeddings are 98 % of their parameters: --keep budgets sit close to 1.
    "budget",
    [Budget(0.5, blocks_only=True), Budget(0.7, blocks_only=True), Budget(0.99)],
)
def test_every_candidate_and_the_plan_respect_the_budget(saved, budget):
    prepared = prepare(saved / "llama", saved / "text.txt", tokens=2048, window=256)
    model = prepared.model
    allowed = budget.counted(model) - budget.reduction(model)
    _, result = plan_for_budget(prepared, budget, gate_steps=2, progress=False)
    assert result.allowed == allowed
    counted = "blocks" if budget.blocks_only else "total"
    assert parameter_breakdown(result.best_model)[counted] <= allowed
    fraction = "keep_blocks" if budget.blocks_only else "keep"
    for candidate in result.candidates:
        assert getattr(candidate, fraction) <= budget.keep + 1e-9, candidate
    # The basis candidates spend the budget nearly to the parameter.
    basis = [c for c in result.candidates if c.kind == "basis"]
    assert basis and max(getattr(c, fraction) for c in basis) > budget.keep - 0.02
    # The scores are sorted best first (lower KL for a decoder).
    values = [c.proxy for c in result.candidates]
    assert values == sorted(values)


def test_candidates_are_scored_once_per_plan_and_the_choice_is_refitted_on_all_data(saved):
    prepared = prepare(saved / "llama", saved / "text.txt", tokens=2048, window=256)
    budget = Budget(0.6, blocks_only=True)
    _, result = plan_for_budget(prepared, budget, allow="drop,basis", gate_steps=2, progress=False)
    plans = [c.plan.to_json(indent=None) for c in result.candidates]
    assert len(plans) == len(set(plans))
    for duplicate in (c for c in result.rejected if c.rejected.startswith("the same plan as")):
        assert duplicate.name not in [c.name for c in result.candidates]
    best = result.best
    assert best.kind == "basis" and best.plan.whitens(), result.explanation()
    everything = prepared.all_calibration()
    assert result.refit_tokens == everything.settings["tokens"] > prepared.calibration.settings["tokens"]
    assert "fitted again on all" in result.explanation()
    # The same plan (same ranks, same size) fitted on the search's batches only differs from the refitted model.
    searched = fold(copy.deepcopy(prepared.model), best.plan, calibration=prepared.calibration.statistics())
    counted = parameter_breakdown(result.best_model)["blocks"]
    assert counted == parameter_breakdown(searched)["blocks"] <= result.allowed
    refitted = dict(result.best_model.named_parameters())
    differs = [n for n, p in searched.named_parameters() if not torch.equal(p, refitted[n])]
    assert differs and not any("embed" in n or "lm_head" in n for n in differs)


# ---- the commands ---------------------------------------------------------------------------------------------
def test_analyze_writes_json_markdown_and_heatmaps(capsys, saved, tmp_path):
    out = tmp_path / "analysis"
    code, stdout, err = run(
        capsys,
        "analyze",
        saved / "llama",
        "--data",
        saved / "text.txt",
        "--out",
        out,
        "--calib-tokens",
        "2048",
        "--gate-steps",
        "3",
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["analysis"]["block_influence"]) == 4 and len(report["analysis"]["gates"]) == 4
    for name in (
        "analysis.json",
        "analysis.md",
        "output_similarity.png",
        "weight_similarity.png",
        "gradient_match.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "output_similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert "Block Influence" in (out / "analysis.md").read_text()


def test_plan_writes_a_plan_that_folds(capsys, saved, tmp_path):
    out = tmp_path / "plan.yaml"
    code, stdout, err = run(
        capsys,
        "plan",
        saved / "bert",
        "--data",
        saved / "text.txt",
        "--keep-blocks",
        "0.5",
        "--allow",
        "drop,tie",
        "--out",
        out,
        "--calib-tokens",
        "2048",
        "--gate-steps",
        "3",
    )
    assert code == 0, err
    assert "Chose" in stdout and out.with_suffix(".md").is_file()
    plan = FoldPlan.load(out)
    assert plan.provenance["planner"] and len(plan.provenance["candidates"]) >= 3
    # The planner's ties are least-squares fits: folding its plan needs the calibration text too, and says so.
    if plan.whitens():
        code, _, err = run(capsys, "fold", saved / "bert", "--plan", out, "--out", tmp_path / "folded")
        assert code != 0 and "need calibration text (--calib PATH)" in err and not (tmp_path / "folded").exists()
    code, _, err = run(capsys, "fold", saved / "bert", "--plan", out, "--out", tmp_path / "folded",
                       *(["--calib", saved / "text.txt", "--calib-tokens", "2048"] if plan.whitens() else []))  # fmt: skip
    assert code == 0, err
    folded = load(tmp_path / "folded")
    original = parameter_breakdown(load_original(saved / "bert"))
    assert parameter_breakdown(folded)["blocks"] <= 0.5 * original["blocks"]


def load_original(path):
    from layerfold.checkpoints.folded import load_source

    return load_source(path)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_compress_with_healing_writes_a_loadable_model_and_reports(capsys, saved, tmp_path, name):
    from transformers import AutoModel, AutoModelForCausalLM

    out = tmp_path / "small"
    code, stdout, err = run(
        capsys,
        "compress",
        saved / name,
        "--data",
        saved / "text.txt",
        "--keep-blocks",
        "0.5",
        "--out",
        out,
        "--calib-tokens",
        "2048",
        "--gate-steps",
        "3",
        "--heal-steps",
        "3",
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["keep_blocks"] <= 0.5 and report["heal"]["steps"] == 3
    for file in ("compress.json", "compress.md", "plan.yaml", "analysis.json", "config.json", "heal.json"):
        assert (out / file).is_file(), file
    model = load(out)
    loader = AutoModelForCausalLM if name == "llama" else AutoModel
    remote = loader.from_pretrained(out, trust_remote_code=True)
    inputs = {"input_ids": torch.randint(3, 100, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    with torch.no_grad():
        a, b = model(**inputs), remote(**inputs)
    key = "logits" if name == "llama" else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    assert not list(tmp_path.glob(".small*"))  # no partial or checkpoint folders left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep-blocks", "1.5"], "--keep-blocks: must be a fraction"),
        (["--keep", "0"], "--keep: must be a fraction"),
        (["--keep", "0.5", "--keep-blocks", "0.5"], "exactly one of"),
        (["--keep-blocks", "0.1", "--allow", "drop,tie"], "no allowed method fits"),
        (["--keep-blocks", "0.5", "--allow", "fold"], "--allow: unknown kind 'fold'"),
        (["--keep-blocks", "0.5", "--allow", "lora"], "allow tie as well"),
        (["--keep-blocks", "0.5", "--data-missing"], "data file not found"),
        (["--keep-blocks", "0.5", "--tiny-data"], "calibration data too short"),
    ],
)
def test_bad_input_gives_one_line(capsys, saved, tmp_path, args, message):
    data = saved / "text.txt"
    if "--data-missing" in args:
        args, data = [a for a in args if a != "--data-missing"], tmp_path / "none.txt"
    if "--tiny-data" in args:
        (tmp_path / "tiny.txt").write_text("A few words, no more than a line of text.\n")
        args, data = [a for a in args if a != "--tiny-data"], tmp_path / "tiny.txt"
    for command, out in (("plan", tmp_path / "p.yaml"), ("compress", tmp_path / "c")):
        code, stdout, err = run(
            capsys,
            command,
            saved / "bert",
            "--data",
            data,
            "--out",
            out,
            "--calib-tokens",
            "2048",
            "--gate-steps",
            "2",
            *args,
        )
        assert code == 2, (command, stdout, err)
        lines = [line for line in err.splitlines() if line.startswith("layerfold: error:")]
        assert len(lines) == 1 and message in lines[0], (command, err)
        assert "Traceback" not in err and not out.exists()


def test_existing_plan_file_is_kept_without_overwrite(capsys, saved, tmp_path):
    out = tmp_path / "plan.yaml"
    out.write_text("mine\n")
    code, _, err = run(
        capsys, "plan", saved / "bert", "--data", saved / "text.txt", "--keep-blocks", "0.5", "--out", out
    )
    assert code == 2 and "--overwrite" in err and out.read_text() == "mine\n"
