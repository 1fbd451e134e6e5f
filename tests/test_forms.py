"""Relaxation forms of tied layers (VeRA, SVFit, MoS pools and index maps, Kronecker factors) on tiny models of every family: save → load
bit-identical, export equal, streamed == in-memory, full size reproduces the original where the form can,
parameter counts are what the checkpoint stores, VeRA's bases are made again identically in another process,
and bad sizes are one clear line."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from conftest import (
    FAMILY_NAMES,
    assert_same_checkpoint,
    assert_saves_loads_and_exports,
    build_tiny,
    in_memory_fold,
    outputs,
    sample_inputs,
)
from safetensors import safe_open

from layerfold import FoldPlan, LayerfoldError
from layerfold.engine.calibrate import Calibration
from layerfold.core.families import family_of
from layerfold.folding.in_memory import fold
from layerfold.heal.trainable import select_trainable
from layerfold.operations.tie.forms import FORMS
from layerfold.operations.tie.modules import FormTiedLinear
from layerfold.operations.tie.spec import FORM_CHOICES
from layerfold.core.report import parameter_breakdown
from layerfold.folding.streamed import stream_fold


def batches(model=None) -> list[dict]:
    return [sample_inputs(seed=s, batch=2, length=16) for s in range(3)]


def form_plan(model, relax, rank, **options) -> FoldPlan:
    """Every layer tied into groups of two (the last three if odd), least squares, whitened, in ``relax``."""
    layers = len(family_of(model).layer_list(model))
    groups = [list(range(i, min(i + 2, layers))) for i in range(0, layers, 2)]
    if len(groups[-1]) == 1:
        groups[-2:] = [groups[-2] + groups[-1]]
    plan = FoldPlan.from_groups(groups, num_layers=layers, rank=rank, fit="lstsq", whiten=True)
    plan.set_tie_options(relax=relax, **options)
    return plan


def folded(model, plan):
    statistics = Calibration(model, batches()).statistics(progress=False)
    return fold(copy.deepcopy(model), plan, calibration=statistics, progress=False)


# Each form's rank and options in these tests (a form not listed: rank 4 and its defaults).
SETTINGS = {"vera": (16, {"seed": 3}), "svfit": (4, {}), "mos": (4, {"private": 2, "mos_shard": 2}), "kronecker": (2, {})}
# The largest setting of the forms that can reproduce the original: a full rank (and for Kronecker all n² slow
# matrices, which span every n × n matrix).
LARGEST = {"svfit": {}, "mos": {}, "kronecker": {"kron_terms": 16}}


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("relax", sorted(FORMS))
def test_a_form_saves_loads_exports_and_streams_the_same(relax, family, tmp_path):
    model = build_tiny(family)
    rank, options = SETTINGS.get(relax, (4, {}))  # a new form: rank 4, its default options
    plan = form_plan(model, relax, rank, **options)
    fold_ = folded(model, plan)
    assert any(isinstance(m, FormTiedLinear) for m in fold_.modules())
    assert_saves_loads_and_exports(fold_, tmp_path)

    # What the checkpoint stores is what is counted: every stored float once, VeRA's bases nowhere.
    stored = 0
    for path in (tmp_path / "folded").glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            stored += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert stored == parameter_breakdown(fold_)["total"]

    source = tmp_path / "original"
    model.save_pretrained(source)
    stream_fold(source, tmp_path / "streamed", plan, calibration=batches, progress=False)
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory", batches))


@pytest.mark.parametrize("relax", sorted(LARGEST))
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "phi3"])
def test_the_largest_setting_reproduces_the_original(relax, family):
    model = build_tiny(family)
    fold_ = folded(model, form_plan(model, relax, "full", **LARGEST[relax]))
    inputs = sample_inputs()
    assert (outputs(fold_, inputs) - outputs(model, inputs)).abs().max() <= 1e-4


@pytest.mark.parametrize("relax, pool", [("mos", "mos_pool_a"), ("mos", "mos_pool_b"), ("kronecker", "kron_slow")])
def test_a_pool_is_one_tensor_per_group_and_projection(relax, pool):
    model = build_tiny("llama")
    fold_ = folded(model, form_plan(model, relax, 4))
    pools = {id(getattr(m.shared, pool)) for m in fold_.modules() if isinstance(m, FormTiedLinear)}
    groups, projections = len(form_plan(model, relax, 4).ties()), len(family_of(model).projections)
    assert len(pools) == groups * projections


def test_a_mos_index_map_picks_shards_and_round_trips(tmp_path):
    """With a pool twice the rank, each position's index maps pick half of the shards (integers, stored, never
    trained); they come back equal from the checkpoint and from a streamed fold, and the output is x times the
    weight the form says it adds."""
    from layerfold.checkpoints.folded import load, save
    from layerfold.operations.tie.forms.mos import shard_rows

    model = build_tiny("llama")
    plan = form_plan(model, "mos", 4, mos_pool=8, mos_shard=2)
    fold_ = folded(model, plan)
    modules = {n: m for n, m in fold_.named_modules() if isinstance(m, FormTiedLinear)}
    maps = {f"{n}.{attr}": getattr(m, attr).detach().clone() for n, m in modules.items()
            for attr in ("mos_index_a", "mos_index_b")}  # fmt: skip
    for name, index in maps.items():
        assert index.dtype == torch.long and index.shape == (2,) and 0 <= int(index.min()) <= int(index.max()) < 4
    assert len({tuple(i.tolist()) for i in maps.values()}) > 1  # positions pick different shards
    for module in modules.values():
        assert module.form.sizes(4, module.out_features, module.in_features)["pool_in"] == 8
        x = torch.randn(3, module.in_features)
        torch.testing.assert_close(module.form.output(module, x), x @ module.form.weight(module).T)
        assert shard_rows(module.mos_index_a, 2).tolist() == [2 * s + o for s in module.mos_index_a.tolist()
                                                               for o in (0, 1)]  # fmt: skip
    select_trainable(fold_, "all", norms=True)
    assert not any(m.mos_index_a.requires_grad for m in modules.values())
    save(fold_, tmp_path / "folded")
    loaded = dict(load(tmp_path / "folded").named_parameters())
    for name, index in maps.items():
        assert torch.equal(loaded[name], index)
    with safe_open(next((tmp_path / "folded").glob("*.safetensors")), "pt") as weights:
        assert weights.get_slice(next(k for k in weights.keys() if "mos_index_a" in k)).get_dtype() == "I64"
    source = tmp_path / "original"
    model.save_pretrained(source)
    stream_fold(source, tmp_path / "streamed", plan, calibration=batches, progress=False)
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory", batches))


def test_mos_fits_exactly_with_pools_and_rank_as_large_as_the_matrix():
    from layerfold.operations.tie.forms.mos import Mos, MosOptions, shard_rows

    generator = torch.Generator().manual_seed(0)
    residuals = {i: torch.randn(24, 40, generator=generator, dtype=torch.float64) for i in range(3)}
    inputs = {i: torch.randn(200, 40, generator=generator, dtype=torch.float64) for i in range(3)}
    grams = {i: x.T @ x for i, x in inputs.items()}
    pool, layers = Mos(MosOptions(mos_shard=4)).fit(residuals, grams, 40, seed=0)
    for i, tensors in layers.items():
        a = pool["mos_pool_a"][shard_rows(tensors["mos_index_a"], 4)]
        b = pool["mos_pool_b"][:, shard_rows(tensors["mos_index_b"], 4)]
        torch.testing.assert_close(b @ tensors["mos_core"] @ a, residuals[i], rtol=0, atol=1e-8)


def test_kronecker_factors_rebuild_their_weight_and_fit_no_worse_with_more_terms():
    """The form's output is x times the weight it says it adds (Σ Aₖ ⊗ sₖtₖ), and more shared slow matrices or a
    larger fast rank never fit the residuals worse (the rearranged SVD is nested)."""
    from layerfold.operations.tie.forms.kronecker import Kronecker, KroneckerOptions

    generator = torch.Generator().manual_seed(0)
    residuals = {i: torch.randn(32, 48, generator=generator, dtype=torch.float64) for i in range(3)}
    errors = []
    for terms, rank in [(2, 2), (4, 2), (4, 6), (16, 8)]:
        form = Kronecker(KroneckerOptions(kron_factor=4, kron_terms=terms))
        pool, layers = form.fit(residuals, {i: None for i in residuals}, rank, seed=0)
        error = 0.0
        for i, tensors in layers.items():
            module = torch.nn.Module()
            module.shared = torch.nn.Module()
            module.shared.kron_slow = pool["kron_slow"]
            module.kron_s, module.kron_t, module.out_features = tensors["kron_s"], tensors["kron_t"], 32
            x = torch.randn(5, 48, generator=generator, dtype=torch.float64)
            torch.testing.assert_close(form.output(module, x), x @ form.weight(module).T)
            error += float((residuals[i] - form.weight(module)).pow(2).sum())
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-18 * 3 * 32 * 48 + 1e-12


def test_pooled_relaxations_fit_better_than_none_and_relax_trains_only_them():
    model = build_tiny("llama")
    inputs = sample_inputs()
    reference = outputs(model, inputs)
    bare = (outputs(folded(model, form_plan(model, "lora", 0)), inputs) - reference).pow(2).mean()
    for relax in sorted(FORMS):
        rank, options = SETTINGS.get(relax, (4, {}))  # a new form: rank 4, its default options
        fold_ = folded(model, form_plan(model, relax, rank, **options))
        assert (outputs(fold_, inputs) - reference).pow(2).mean() < bare, relax
        counts = select_trainable(fold_, "relax", norms=False)
        relaxations = {id(p): p for m in fold_.modules() if isinstance(m, FormTiedLinear)
                       for p in m.relaxation_parameters()}  # fmt: skip
        assert counts["trainable"] == sum(p.numel() for p in relaxations.values()) > 0, relax
        assert not any(m.shared.weight.requires_grad for m in fold_.modules() if isinstance(m, FormTiedLinear))


def test_every_registered_form_is_a_plan_choice():
    assert FORM_CHOICES == ("lora", *FORMS)


def test_vera_bases_are_the_same_in_another_process():
    from layerfold.operations.tie.forms.vera import bases

    here = bases(7, 16, 24, 32)
    code = ("import torch; from layerfold.operations.tie.forms.vera import bases; a, b = bases(7, 16, 24, 32); "
            "print(repr(float(a.double().sum())), repr(float(b.double().pow(2).sum())))")  # fmt: skip
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [float(v) for v in there] == [float(here[0].sum()), float(here[1].pow(2).sum())]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"relax": "kron"}, r"relax: must be one of lora, vera, svfit, mos, kronecker, got 'kron'"),
        ({"relax": "kronecker", "rank": 2, "kron_factor": 3}, r"3x3 Kronecker factors do not tile a \d+x\d+ projection"),
        ({"relax": "kronecker", "rank": 2, "kron_terms": 17}, r"17 Kronecker slow matrices of 4x4 are more than the 16"),
        ({"relax": "kronecker", "rank": 10_000}, r"fast factors need a rank of 1 to \d+"),
        ({"relax": "kronecker", "rank": 2, "kron_terms": -1}, r"kron_terms: must be a non-negative integer"),
        ({"relax": "vera", "rank": 0}, r"a vera relaxation needs a rank \(its bases'\) of 1 to \d+"),
        ({"relax": "vera", "rank": 100_000}, r"a vera relaxation needs a rank \(its bases'\) of 1 to \d+"),
        ({"relax": "mos", "rank": 4, "mos_pool": 10**6}, r"a mos pool of 1000000 vectors is larger than"),
        ({"relax": "svfit", "rank": 10**6}, r"rank 1000000 is larger than a \d+x\d+ projection allows"),
        ({"relax": "kronecker", "rank": 2, "kron_factor": 10**6}, r"1000000x1000000 Kronecker factors do not tile"),
        ({"relax": "mos", "rank": 10_000}, r"a mos relaxation needs a rank of 1 to \d+ pool vectors"),
        ({"relax": "mos", "rank": 4, "mos_pool": 2}, r"a mos pool of 2 vectors is too small for the 4 each position"),
        ({"relax": "mos", "rank": 4, "mos_shard": 3}, r"mos shards of 3 vectors do not divide the rank 4"),
        ({"relax": "mos", "rank": 4, "mos_pool": 10, "mos_shard": 4}, r"do not divide the pool of 10 vectors"),
        ({"relax": "mos", "rank": 4, "mos_shard": -2}, r"mos_shard: must be a non-negative integer"),
        ({"relax": "mos", "rank": 4, "private": 10_000}, r"private rank 10000 is out of range"),
        ({"relax": "svfit", "seed": -1}, r"seed: must be a non-negative integer"),
    ],
)
def test_bad_form_settings_are_one_clear_line(change, message):
    model = build_tiny("llama")
    plan = form_plan(model, "lora", 4)
    data = plan.to_dict()
    for op in data["operations"]:
        if op["op"] == "tie":
            op.update(change)
    with pytest.raises(LayerfoldError, match=message):
        FoldPlan.from_dict(data).validate(model)


@pytest.mark.parametrize("relax", ["lora", *sorted(FORMS)])
def test_the_counted_relaxation_size_is_what_the_fold_stores(relax):
    """The planner fills a budget with ``relaxation_params``: it must be what the fold really holds."""
    from layerfold.operations.tie.build import relaxation_params

    model = build_tiny("llama")
    rank, options = SETTINGS.get(relax, (4, {}))
    plan = form_plan(model, relax, rank, **options)
    bare = form_plan(model, "lora", 0)
    blocks = family_of(model).layer_list(model)
    counted = sum(relaxation_params(op, family_of(model), blocks[op.layers[0]]) for op in plan.ties())
    measured = parameter_breakdown(folded(model, plan))["blocks"] - parameter_breakdown(folded(model, bare))["blocks"]
    assert counted == measured


# Every size option of every form, given on the command line: refused in one line before anything is allocated,
# under an address-space limit that a fold of this size would exceed.
_SIZES_UNDER_A_LIMIT = """
import contextlib, io, json, resource, sys
limit = 6 * 1024**3  # torch and transformers need about 2-3 GB of address space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from layerfold.cli.commands import main
results = []
for extra in json.loads(sys.argv[3]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["fold", sys.argv[1], "--out", sys.argv[2], "--strategy", "cycle", "--unique", "2", *extra])
    results.append([code, err.getvalue().strip().splitlines()[-1:]])
print(json.dumps(results))
"""
TOO_LARGE = [
    (["--relax", "vera", "--rank", "100000"], "a vera relaxation needs a rank"),
    (["--relax", "lora", "--rank", "100000"], "rank 100000 is larger than"),
    (["--relax", "svfit", "--rank", "100000"], "rank 100000 is larger than"),
    (["--relax", "mos", "--rank", "100000"], "a mos relaxation needs a rank of 1 to"),
    (["--relax", "mos", "--rank", "4", "--mos-pool", "100000000"], "a mos pool of 100000000 vectors is larger"),
    (["--relax", "mos", "--rank", "4", "--mos-shard", "100000000"], "do not divide the rank 4"),
    (["--relax", "mos", "--rank", "4", "--private", "100000000"], "private rank 100000000 is out of range"),
    (["--relax", "kronecker", "--rank", "100000"], "fast factors need a rank of 1 to"),
    (["--relax", "kronecker", "--rank", "2", "--kron-factor", "100000000"], "Kronecker factors do not tile"),
    (["--relax", "kronecker", "--rank", "2", "--kron-terms", "100000000"], "Kronecker slow matrices of 4x4 are more"),
    (["--relax", "mos", "--rank", "4", "--mos-pool", "0"], "'--mos-pool'"),
    (["--relax", "mos", "--rank", "4", "--mos-shard", "0"], "'--mos-shard'"),
    (["--relax", "kronecker", "--rank", "2", "--kron-factor", "0"], "'--kron-factor'"),
    (["--relax", "kronecker", "--rank", "2", "--kron-terms", "0"], "'--kron-terms'"),
    (["--relax", "mos", "--rank", "4", "--private", "-1"], "'--private'"),
]


def test_every_relaxation_size_option_is_bounded_before_anything_is_allocated(tmp_path):
    import json

    build_tiny("llama").save_pretrained(tmp_path / "llama")
    cases = json.dumps([extra for extra, _ in TOO_LARGE])
    result = subprocess.run([sys.executable, "-c", _SIZES_UNDER_A_LIMIT, tmp_path / "llama", tmp_path / "out", cases],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for (code, last), (extra, message) in zip(json.loads(result.stdout.strip().splitlines()[-1]), TOO_LARGE):
        assert code == 2 and last and last[0].startswith("layerfold: error: ") and message in last[0], (extra, last)
    assert not (tmp_path / "out").exists()