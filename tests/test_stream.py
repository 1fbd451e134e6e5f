"""Streamed folding (layerfold fold --stream): the same tensors as the in-memory fold, from single-file and
sharded checkpoints, in the checkpoint's dtype; bad checkpoints and interruptions leave nothing behind."""

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

from layerfold.core.budget import Budget
from layerfold.engine.calibrate import calibration_batches
from layerfold.core.tensor_files import INDEX_NAME, ShardWriter
from layerfold.cli.commands import main
from layerfold.jobs.demo import pydoc_paragraphs
from layerfold.core.errors import LayerfoldError
from layerfold.folding.in_memory import fold
from layerfold.checkpoints.folded import load, load_source, load_tokenizer, read_weights, save
from layerfold.operations import Drop, Merge, Tie
from layerfold.operations.plan import FoldPlan
from layerfold.folding.streamed import stream_fold
from layerfold.methods.registry import method_plan

PLANS = {
    "cycle, rank 4": lambda: FoldPlan.cycle(4, 2, rank=4),
    "sequence, lower, full rank": lambda: FoldPlan.sequence(4, 2, fit="lower", rank="full"),
    "attention only, shared bias, stepwise": lambda: FoldPlan.cycle(
        4, 2, share="attention", share_bias=True, fit="stepwise", rank={"attention": 2}
    ),
    "drop": lambda: FoldPlan.from_groups([], drop=[1, 2], num_layers=4),
    "LaCo merge + tie": lambda: FoldPlan(4, [Merge(into=1, layers=[2]), Tie(layers=[0, 3], rank=2), Drop([2])]),
    "chained LaCo merges": lambda: FoldPlan(
        4, [Merge(into=2, layers=[3]), Merge(into=0, layers=[1, 2]), Drop([1, 2, 3])]
    ),
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_tie_is_bit_identical_to_the_in_memory_fold(family, tmp_path):
    source = tmp_path / "original"
    build_tiny(family).save_pretrained(source, max_shard_size="100KB")  # shards and an index
    assert (source / INDEX_NAME).is_file()
    plan = PLANS["cycle, rank 4"]()
    streamed = tmp_path / "streamed"
    report = stream_fold(source, streamed, plan, progress=False)
    assert report["units"] > 0 and report["output_bytes"] > 0
    assert_same_checkpoint(streamed, in_memory_fold(source, plan, tmp_path / "memory"))
    inputs = sample_inputs()
    assert torch.equal(outputs(load(streamed), inputs), outputs(load(tmp_path / "memory"), inputs))


@pytest.mark.parametrize("name", [n for n in PLANS if n != "cycle, rank 4"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_streamed_plans_are_bit_identical(family, name, tmp_path):
    source = tmp_path / "original"
    build_tiny(family).save_pretrained(source)
    plan = PLANS[name]()
    stream_fold(source, tmp_path / "streamed", plan, progress=False)
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory"))


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("stream"), names=("llama", "bert", "gpt2"))
    (root / "text.txt").write_text("\n\n".join(pydoc_paragraphs(200)))
    return root


@pytest.mark.parametrize("method", ["basis", "svd"])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_streamed_whitened_factorisation_is_bit_identical(with_tokenizer, family, method, tmp_path):
    source = with_tokenizer / family
    tokenizer = load_tokenizer(source)

    def batches(model):
        return calibration_batches(model, tokenizer, with_tokenizer / "text.txt", tokens=1024, window=128)

    streamed = tmp_path / "streamed"
    report = stream_fold(
        source, streamed, method_plan(method, Budget(0.6, blocks_only=True)), calibration=batches, progress=False
    )
    plan = FoldPlan.from_dict(report["plan"].to_dict())  # the plan as saved
    assert plan.whitens() and plan.factors()
    assert_same_checkpoint(streamed, in_memory_fold(source, plan, tmp_path / "memory", batches))


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_streamed_least_squares_tie_is_bit_identical(with_tokenizer, family, tmp_path):
    source = with_tokenizer / family
    tokenizer = load_tokenizer(source)

    def batches(model):
        return calibration_batches(model, tokenizer, with_tokenizer / "text.txt", tokens=1024, window=128)

    plan = FoldPlan.cycle(4, 2, fit="lstsq", rank=3, whiten=True)
    stream_fold(source, tmp_path / "streamed", plan, calibration=batches, progress=False)
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory", batches))
    with pytest.raises(LayerfoldError, match="least-squares ties .* need calibration text"):
        stream_fold(source, tmp_path / "no-calibration", plan, progress=False)
    assert not (tmp_path / "no-calibration").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streamed_fold_keeps_the_dtype(dtype, tmp_path):
    source = tmp_path / "original"
    build_tiny("llama").to(dtype).save_pretrained(source)
    plan = FoldPlan.cycle(4, 2, rank=4)
    stream_fold(source, tmp_path / "streamed", plan, progress=False)
    weights = read_weights(tmp_path / "streamed")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {dtype}
    assert_same_checkpoint(tmp_path / "streamed", in_memory_fold(source, plan, tmp_path / "memory"))
    assert load(tmp_path / "streamed").dtype == dtype


def test_large_outputs_are_sharded_and_load_the_same_way(tmp_path):
    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source)
    plan = FoldPlan.cycle(4, 2, rank=4)
    streamed = tmp_path / "streamed"
    report = stream_fold(source, streamed, plan, max_shard_bytes=60_000, progress=False)
    assert report["shards"] > 2 and (streamed / INDEX_NAME).is_file()
    assert not list(streamed.glob("*.partial")) and not (streamed / "model.safetensors").exists()
    memory = tmp_path / "memory"
    model = load_source(source)
    fold(model, plan, progress=False)
    save(model, memory, source=source, max_shard_bytes=60_000)  # the in-memory save shards the same way
    assert (memory / INDEX_NAME).is_file()
    assert_same_checkpoint(streamed, memory)
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs()
    hub = AutoModelForCausalLM.from_pretrained(streamed, trust_remote_code=True)
    assert torch.equal(outputs(hub, inputs), outputs(model, inputs))


def test_an_interrupted_streamed_fold_leaves_no_output(tmp_path, monkeypatch):
    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source)
    calls = {"n": 0}
    add = ShardWriter.add

    def interrupt(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        stream_fold(source, tmp_path / "out", FoldPlan.cycle(4, 2, rank=4), max_shard_bytes=20_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_streams_a_method_at_a_budget(with_tokenizer, capsys, tmp_path):
    out = tmp_path / "out"
    args = ["fold", with_tokenizer / "llama", "--out", out, "--stream", "--method", "tie-cycle", "--keep-blocks"]
    code, stdout, err = run(capsys, *args, "0.5", "--rank", "4", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["streamed"] and report["peak_rss_bytes"] > 0 and report["budget"]["counts"] == "blocks"
    assert (out / "tokenizer.json").is_file() and load(out).config.num_hidden_layers == 4
    # The same command without --stream writes the same model and reports the same sizes.
    code, stdout, err = run(capsys, *args[:3], tmp_path / "memory", *args[5:], "0.5", "--rank", "4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["keep_blocks"] == report["keep_blocks"]
    assert_same_checkpoint(out, tmp_path / "memory")


def _bad_checkpoint(tmp_path, damage: str):
    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source, max_shard_size="100KB")
    shards = sorted(source.glob("model-*.safetensors"))
    if damage == "missing shard":
        shards[1].unlink()
    elif damage == "corrupt header":
        data = bytearray(shards[0].read_bytes())
        data[8:40] = b"\x00garbage that is not JSON at all"
        shards[0].write_bytes(bytes(data))
    elif damage == "truncated shard":
        shards[0].write_bytes(shards[0].read_bytes()[:6])
    elif damage == "index names a missing tensor":
        index = json.loads((source / INDEX_NAME).read_text())
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shards[0].name
        (source / INDEX_NAME).write_text(json.dumps(index))
    elif damage == "no weights":
        for shard in shards:
            shard.unlink()
        (source / INDEX_NAME).unlink()
    return source


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing shard", "checkpoint shard missing"),
        ("corrupt header", "not a readable safetensors file"),
        ("truncated shard", "not a readable safetensors file"),
        ("index names a missing tensor", "lacks tensor model.layers.9.mlp.up_proj.weight"),
        ("no weights", "no model.safetensors or model.safetensors.index.json"),
    ],
)
def test_a_bad_checkpoint_gives_one_line(damage, message, capsys, tmp_path):
    source = _bad_checkpoint(tmp_path, damage)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "fold", source, "--out", out, "--stream", "--strategy", "cycle", "--unique", "2")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_stream_rejects_methods_that_need_the_whole_model(capsys, tmp_path):
    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source)
    capsys.readouterr()
    for extra, message in (
        (["--method", "shortgpt"], "measures the whole model"),
        (["--method", "svd", "--allocation", "sensitivity"], "--allocation uniform"),
        (["--method", "basis"], "need calibration text (--calib PATH)"),
    ):
        code, _, err = run(
            capsys, "fold", source, "--out", tmp_path / "out", "--stream", "--keep-blocks", "0.5", *extra
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    code, _, err = run(capsys, "fold", source, "--out", tmp_path / "out", "--stream", "--method", "basis")
    assert code == 2 and "--keep" in err, err
