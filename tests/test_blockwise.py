"""Block-wise healing (``heal --stage blockwise|both``): its units, that it lowers each unit's error and leaves
frozen tensors bit-identical, that the streamed heal equals the in-memory one, that a killed run resumes, the
shared tensors' own learning rate, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny_with_tokenizer
from safetensors.torch import load_file
from transformers import TrainerCallback

import layerfold
from layerfold.cli.commands import main
from layerfold.jobs.demo import pydoc_paragraphs
from layerfold.heal import HealConfig, heal, select_trainable
from layerfold.heal.blockwise import plan_units, target_layers
from layerfold.operations import Drop, Merge
from layerfold.operations.plan import FoldPlan

MODELS = ("llama", "bert")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny llama and bert with a real tokenizer: a cycle tie over all four layers (rank 4), and two layers dropped."""
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("blockwise"))
    (root / "text.txt").write_text("\n\n".join(pydoc_paragraphs(400)))
    FoldPlan.from_groups([], drop=[1, 3], num_layers=4).save(root / "drop.yaml")
    for name in MODELS:
        tie = ["--strategy", "cycle", "--unique", "2", "--rank", "4"]
        assert main(["fold", str(root / name), *tie, "--out", str(root / f"{name}-tied")]) == 0
        assert main(["fold", str(root / name), "--plan", str(root / "drop.yaml"), "--out", str(root / f"{name}-dropped")]) == 0
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def heal_args(saved, student, out, *extra):
    model = student.split("-")[0]
    return ["heal", saved / student, "--teacher", saved / model, "--data", saved / "text.txt", "--out", out,
            "--seq-len", "64", "--eval-examples", "4", "--block-steps", "12", "--block-lr", "1e-3",
            "--block-tokens", "4096", *extra]  # fmt: skip


# ---- units ---------------------------------------------------------------------------------------------------
def test_units_follow_the_shared_tensors_that_train(saved):
    tied = layerfold.load(saved / "llama-tied")
    select_trainable(tied, "all", True)
    (whole,) = plan_units(tied, 10**9)
    assert whole.positions == [0, 1, 2, 3] and whole.shared_trains and not whole.note
    # Too large to train together: one layer at a time, the shared tensors frozen, and the note says so.
    single = plan_units(tied, 300_000)
    assert [u.positions for u in single] == [[0], [1], [2], [3]]
    assert all(not u.shared_trains and u.shared and "frozen" in u.note for u in single)
    # Shared tensors that do not train (--train relax) join no layers.
    select_trainable(tied, "relax", False)
    assert [u.positions for u in plan_units(tied, 10**9)] == [[0], [1], [2], [3]]
    dropped = layerfold.load(saved / "llama-dropped")
    select_trainable(dropped, "all", True)
    assert [u.positions for u in plan_units(dropped, 10**9)] == [[0], [1]]


def test_targets_are_the_outputs_before_the_next_kept_layer():
    assert target_layers(FoldPlan(4, [Drop([1, 3])])) == [1, 3]  # layer 0 absorbs 1; layer 2 absorbs 3
    assert target_layers(FoldPlan(6, [Merge(into=1, layers=[2, 3]), Drop([2, 3])])) == [0, 3, 4, 5]
    assert target_layers(FoldPlan(3, [])) == [0, 1, 2]


# ---- what it does ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_blockwise_lowers_each_units_error_and_leaves_frozen_tensors_bit_identical(capsys, saved, tmp_path, model):
    out = tmp_path / "healed"
    args = heal_args(saved, f"{model}-tied", out, "--stage", "blockwise", "--train", "relax", "--json")
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(stdout)
    units = report["blockwise"]["per_unit"]
    assert [u["positions"] for u in units] == [[0], [1], [2], [3]]
    assert all(u["held_out_after"] <= u["held_out_before"] for u in units)
    assert any(u["held_out_after"] < 0.9 * u["held_out_before"] for u in units)
    assert report["steps"] == 0 and report["stage"] == "blockwise"
    metric = "kl" if model == "llama" else "cosine"
    before, after = report["fidelity_before"][f"before_{metric}"], report["fidelity_after"][f"after_{metric}"]
    assert (after < before) if metric == "kl" else (after > before)
    original, healed = load_file(saved / f"{model}-tied" / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == healed.keys()
    changed = {name for name in original if not torch.equal(original[name], healed[name])}
    assert changed and all("lora_" in name for name in changed)
    assert "Block-wise stage" in (out / "heal.md").read_text() and "block-wise heal" in err
    assert not (tmp_path / "healed.checkpoints").exists()


@pytest.mark.parametrize("model", MODELS)
def test_both_stages_run_blockwise_then_end_to_end(capsys, saved, tmp_path, model):
    code, stdout, err = run(capsys, *heal_args(saved, f"{model}-dropped", tmp_path / "h", "--steps", "4", "--json"))
    assert code == 0, err
    report = json.loads(stdout)
    assert report["stage"] == "both" and report["steps"] == 4 and report["blockwise"]["units"] == 2
    metric = "kl" if model == "llama" else "cosine"
    before = report["fidelity_before"][f"before_{metric}"]
    blockwise = report["blockwise"]["fidelity_after"][f"blockwise_{metric}"]
    assert (blockwise < before) if metric == "kl" else (blockwise > before)
    # One table row per evaluation above the bar (after its header), no Trainer log dictionaries.
    assert "{'eval" not in err and "  step |" in err


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fold, extra", [("tied", ()), ("dropped", ()), ("tied", ("--unit-memory", "300KB"))])
def test_streamed_blockwise_heal_equals_the_in_memory_one(capsys, saved, tmp_path, model, fold, extra):
    common = ["--stage", "blockwise", *extra]
    code, _, err = run(capsys, *heal_args(saved, f"{model}-{fold}", tmp_path / "memory", *common))
    assert code == 0, err
    code, stdout, err = run(capsys, *heal_args(saved, f"{model}-{fold}", tmp_path / "streamed", *common, "--stream", "--json"))
    assert code == 0, err
    report = json.loads(stdout)
    assert report["peak_rss_bytes"] > 0 and report["blockwise"]["units"] >= 2 - (fold == "tied" and not extra)
    memory, streamed = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "streamed" / "model.safetensors")
    assert memory.keys() == streamed.keys()
    for name in memory:
        assert torch.equal(memory[name], streamed[name]), name
    assert any(not torch.equal(memory[n], t) for n, t in load_file(saved / f"{model}-{fold}" / "model.safetensors").items())
    healed = layerfold.load(tmp_path / "streamed")  # a sound folded checkpoint, with its tokenizer and config
    assert healed.config.model_type == model and (tmp_path / "streamed" / "heal.md").is_file()


def test_logits_from_the_last_blocks_output_match_the_model_on_every_decoder():
    from conftest import DECODERS, build_tiny

    from layerfold.core.families import family_of
    from layerfold.heal.losses import head_kl, logits_from_block_output

    for name in DECODERS:
        model = build_tiny(name).eval()
        captured = {}
        last = family_of(model).layer_list(model)[-1]
        handle = last.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
        ids = torch.randint(3, 100, (2, 7))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            handle.remove()
            assert torch.allclose(logits_from_block_output(model, captured["h"]), logits, atol=1e-5), name
            mask = torch.ones(2, 7, dtype=torch.long)
            assert head_kl(model, captured["h"], captured["h"], mask).abs() < 1e-6, name
            assert head_kl(model, captured["h"] + torch.randn_like(captured["h"]), captured["h"], mask) > 0, name


def test_a_streamed_heal_with_a_sentence_transformers_teacher_equals_the_in_memory_one(capsys, saved, tmp_path):
    """A sentence-transformers folder (modules.json: the embedded default's layout) is built as its base model class
    (AutoModel is a loader, not a class with _from_config), for the streamed heal's teacher and the streamed fold."""
    teacher = tmp_path / "bert-st"
    shutil.copytree(saved / "bert", teacher)
    (teacher / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))  # fmt: skip
    (teacher / "1_Pooling").mkdir()
    (teacher / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64}))
    tie = ["--strategy", "cycle", "--unique", "2", "--rank", "4"]
    assert main(["fold", str(teacher), *tie, "--stream", "--out", str(tmp_path / "bert-st-tied")]) == 0
    outs = {}
    for label, extra in (("memory", ()), ("streamed", ("--stream",))):
        args = heal_args(saved, "bert-tied", tmp_path / label, "--stage", "blockwise", *extra)
        args[1], args[3] = tmp_path / "bert-st-tied", teacher  # the student and teacher of this test
        code, _, err = run(capsys, *args)
        assert code == 0, err
        outs[label] = load_file(tmp_path / label / "model.safetensors")
    assert outs["memory"].keys() == outs["streamed"].keys()
    assert all(torch.equal(outs["memory"][n], outs["streamed"][n]) for n in outs["memory"])
    assert (tmp_path / "streamed" / "modules.json").is_file()  # still a sentence-transformers folder


def test_block_kl_adds_the_heads_divergence_to_the_last_unit_and_streams(capsys, saved, tmp_path):
    reports = {}
    for label, extra in (("mse", ()), ("kl", ("--block-kl", "1")), ("kl-streamed", ("--block-kl", "1", "--stream"))):
        args = heal_args(saved, "llama-dropped", tmp_path / label, "--stage", "blockwise", *extra, "--json")
        code, stdout, err = run(capsys, *args)
        assert code == 0, err
        reports[label] = json.loads(stdout)
    mse, kl = (reports[k]["blockwise"]["per_unit"] for k in ("mse", "kl"))
    # The first unit's loss is the same; the last unit's has the KL term on top.
    assert mse[0]["held_out_before"] == pytest.approx(kl[0]["held_out_before"])
    assert kl[-1]["held_out_before"] > mse[-1]["held_out_before"] and kl[-1]["held_out_after"] < kl[-1]["held_out_before"]
    assert reports["kl"]["fidelity_after"]["after_kl"] < reports["kl"]["fidelity_before"]["before_kl"]
    memory, streamed = load_file(tmp_path / "kl" / "model.safetensors"), load_file(tmp_path / "kl-streamed" / "model.safetensors")
    assert all(torch.equal(memory[name], streamed[name]) for name in memory)


_KILL_AFTER_FIRST_UNIT = """
import os, signal, sys
import layerfold.heal.blockwise as blockwise
from layerfold.cli.commands import main

save = blockwise._save_unit
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
blockwise._save_unit = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stream", [False, True])
def test_a_killed_blockwise_heal_resumes(capsys, saved, tmp_path, stream):
    common = ["--stage", "blockwise", *(["--stream"] if stream else []), "--json"]
    code, stdout, err = run(capsys, *heal_args(saved, "llama-dropped", tmp_path / "straight", *common))
    assert code == 0, err
    killed = tmp_path / "resumed"
    args = [str(a) for a in heal_args(saved, "llama-dropped", killed, *common)]
    result = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_UNIT, *args], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    assert not killed.exists() and (tmp_path / "resumed.checkpoints" / "blockwise" / "units.json").is_file()
    code, stdout, err = run(capsys, *heal_args(saved, "llama-dropped", killed, *common, "--resume"))
    assert code == 0, err
    units = json.loads(stdout)["blockwise"]["per_unit"]
    assert [u["resumed"] for u in units] == [True, False]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- end to end: the shared tensors' own learning rate -----------------------------------------------------------
class _Groups(TrainerCallback):
    def __init__(self):
        self.groups = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.groups = [(len(g["params"]), g["lr"]) for g in optimizer.param_groups]


def test_shared_tensors_train_at_their_own_learning_rate(saved, tmp_path):
    groups = _Groups()
    config = HealConfig(steps=2, batch=2, seq_len=64, eval_examples=4, stage="e2e", lr=1e-4, shared_lr=1e-5)
    heal(saved / "llama-tied", saved / "llama", saved / "text.txt", tmp_path / "h", config, callbacks=[groups])
    shared = len(list(layerfold.load(saved / "llama-tied").base_model.layerfold_shared.parameters()))
    assert [lr for _, lr in groups.groups] == [1e-4, 1e-5] and groups.groups[1][0] == shared


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (("--stage", "bogus"), "'bogus' is not one of"),
        (("--stage", "blockwise", "--unit-memory", "1KB"), "more than --unit-memory"),
        (("--unit-memory", "lots"), "--unit-memory: not a size"),
        (("--stream",), "--stream heals block-wise only"),
        (("--stage", "blockwise", "--block-steps", "0"), "--block-steps must be at least 1"),
        (("--block-lr", "-1"), "--block-lr must be a positive number"),
        (("--block-kl", "-1"), "--block-kl must be a number of at least 0"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(capsys, saved, tmp_path, extra, message):
    for stream in ((), ("--stream",)) if "--stream" not in extra and "blockwise" in extra else ((),):
        code, out, err = run(capsys, *heal_args(saved, "llama-tied", tmp_path / "h", *extra, *stream))
        assert code == 2 and message in err and "Traceback" not in err and out == ""
        assert not (tmp_path / "h").exists() and not (tmp_path / "h.checkpoints").exists()


def test_block_kl_on_an_encoder_is_refused_in_one_line(capsys, saved, tmp_path):
    code, out, err = run(capsys, *heal_args(saved, "bert-tied", tmp_path / "h", "--block-kl", "1"))
    assert code == 2 and "--block-kl reads the next-token distribution" in err and "Traceback" not in err
    assert out == "" and not (tmp_path / "h").exists()
