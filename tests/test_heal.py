"""Healing by distillation: losses, what trains, data, the Trainer run, resume after SIGKILL, two processes under
accelerate launch, and bad input."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DECODERS, build_tiny, save_tiny_with_tokenizer
from safetensors.torch import load_file

import layerfold
from layerfold.cli.commands import main
from layerfold.jobs.demo import pydoc_paragraphs
from layerfold.core.errors import LayerfoldError
from layerfold.heal import (
    HealConfig,
    LossWeights,
    distillation_losses,
    logits_from_hidden,
    prepare_data,
    read_documents,
    select_trainable,
    teacher_layer_map,
)
from layerfold.checkpoints.folded import load_tokenizer
from layerfold.operations import Drop, Merge
from layerfold.operations.plan import FoldPlan

STS_LINE = "main-captions\tMSRvid\t2012test\t0001\t{score}\t{a}\t{b}\n"


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny llama and bert with a real tokenizer, each folded (cycle tie, rank 4) and with blocks dropped."""
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("heal"))
    (root / "text.txt").write_text("\n\n".join(pydoc_paragraphs(400)))
    for name in ("llama", "bert"):
        assert (
            main(
                [
                    "fold",
                    str(root / name),
                    "--strategy",
                    "cycle",
                    "--unique",
                    "2",
                    "--rank",
                    "4",
                    "--out",
                    str(root / f"{name}-tied"),
                ]
            )
            == 0
        )
        plan = FoldPlan.from_groups([], drop=[1, 3], num_layers=4)
        plan.save(root / "drop.yaml")
        assert (
            main(["fold", str(root / name), "--plan", str(root / "drop.yaml"), "--out", str(root / f"{name}-dropped")])
            == 0
        )
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def heal_args(saved, model, out, *extra):
    return [
        "heal",
        saved / f"{model}-tied",
        "--teacher",
        saved / model,
        "--data",
        saved / "text.txt",
        "--out",
        out,
        "--steps",
        "8",
        "--batch",
        "4",
        "--seq-len",
        "64",
        "--eval-examples",
        "4",
        *extra,
    ]


# ---- losses -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)
def test_logits_from_hidden_state_match_the_model(family):
    model = build_tiny(family)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(logits_from_hidden(model, out.hidden_states[-1]), out.logits)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_and_lm_equal_the_direct_losses_and_gradients(family, temperature):
    student, teacher = build_tiny(family, seed=0), build_tiny(family, seed=1)
    ids = torch.randint(3, 128, (2, 300))
    mask = torch.ones_like(ids)
    mask[0, 210:] = 0  # padding at the end of one row
    batch = {"input_ids": ids, "attention_mask": mask}
    s_out = student(**batch, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True)
    parts = distillation_losses(
        s_out,
        t_out,
        batch,
        LossWeights(kl=1, lm=0.5),
        temperature=temperature,
        student_head=functools.partial(logits_from_hidden, student),
        teacher_head=functools.partial(logits_from_hidden, teacher),
    )
    m = mask.bool()
    kl = (
        F.kl_div(
            F.log_softmax(s_out.logits[m] / temperature, -1),
            F.log_softmax(t_out.logits[m] / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    lm = F.cross_entropy(s_out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].masked_fill(~m[:, 1:], -100).reshape(-1))
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=2e-6)  # a difference of two ~5s in fp32
    assert parts["lm"].item() == pytest.approx(lm.item(), rel=1e-5)
    weight = next(p for n, p in student.named_parameters() if "layers.0" in n or "h.0" in n)
    ours = torch.autograd.grad(parts["kl"] + 0.5 * parts["lm"], weight, retain_graph=True)[0]
    direct = torch.autograd.grad(kl + 0.5 * lm, weight)[0]
    torch.testing.assert_close(ours, direct, rtol=1e-3, atol=1e-6)


def test_top_k_cache_kl_equals_full_kl_when_k_is_the_vocabulary():
    student, teacher = build_tiny("llama", 0), build_tiny("llama", 1)
    ids = torch.randint(3, 128, (2, 20))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    s_out = student(**batch, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True)
    head = functools.partial(logits_from_hidden, student)
    full = distillation_losses(
        s_out,
        t_out,
        batch,
        LossWeights(kl=1),
        student_head=head,
        teacher_head=functools.partial(logits_from_hidden, teacher),
    )["kl"]
    top = t_out.logits.topk(128, dim=-1)
    cached = distillation_losses(
        s_out, None, batch, LossWeights(kl=1), student_head=head, cached=(top.values, top.indices)
    )["kl"]
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)
    top8 = t_out.logits.topk(8, dim=-1)
    truncated = distillation_losses(
        s_out, None, batch, LossWeights(kl=1), student_head=head, cached=(top8.values, top8.indices)
    )["kl"]
    assert torch.isfinite(truncated) and truncated.item() != pytest.approx(full.item(), rel=1e-3)


def test_hidden_and_cosine_losses_are_zero_for_identical_outputs():
    model = build_tiny("bert")
    ids = torch.randint(3, 128, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    parts = distillation_losses(out, out, batch, LossWeights(hidden=1, cosine=1), hidden_pairs=[(2, 2), (-1, -1)])
    assert parts["hidden"].item() == 0 and parts["cosine"].item() == pytest.approx(0, abs=1e-6)


def test_loss_weights_parse():
    assert LossWeights.parse("kl=1,hidden=0.5").active() == {"kl": 1.0, "hidden": 0.5}
    assert LossWeights.parse("lm").active() == {"lm": 1.0}
    for bad in ("kl=x", "nope=1", "kl=0", "kl=-1"):
        with pytest.raises(LayerfoldError):
            LossWeights.parse(bad)


def test_defaults_depend_on_the_model_kind():
    decoder, encoder = HealConfig().resolved(causal=True), HealConfig().resolved(causal=False)
    assert decoder.loss.active() == {"kl": 1.0} and decoder.seq_len == 512
    assert encoder.loss.active() == {"cosine": 1.0, "hidden": 1.0} and encoder.seq_len == 128
    with pytest.raises(LayerfoldError, match="causal language model"):
        HealConfig(loss=LossWeights(kl=1)).resolved(causal=False)
    with pytest.raises(LayerfoldError, match="kl loss only"):
        HealConfig(loss=LossWeights(kl=1, hidden=1), teacher_cache="x").resolved(causal=True)


def test_teacher_layer_map_follows_drops_and_merges():
    assert teacher_layer_map(FoldPlan.from_groups([], drop=[1, 3], num_layers=6)) == [0, 2, 4, 5]
    # LaCo: layer 0 absorbs 1 and 2, then layer 3 absorbs 4 (a merge into a layer that a later merge absorbs).
    plan = FoldPlan(6, [Merge(into=3, layers=[4]), Merge(into=0, layers=[1, 2]), Drop([1, 2, 4])])
    assert teacher_layer_map(plan) == [2, 4, 5]


# ---- what trains ---------------------------------------------------------------------------------------------
def test_select_trainable_by_role(saved):
    model = layerfold.load(saved / "llama-tied")
    relax = select_trainable(model, "relax", norms=False)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert relax["trainable"] == lora == relax["relax"] > 0
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    shared = select_trainable(model, "relax+shared", norms=True)
    assert shared["trainable"] == lora + shared["shared"] + shared["norms"]
    everything = select_trainable(model, "all", norms=False)
    assert everything["trainable"] == everything["total"] - everything["norms"]
    with pytest.raises(LayerfoldError, match="nothing to train with --train relax"):
        select_trainable(layerfold.load(saved / "llama-dropped"), "relax", norms=False)


# ---- data ----------------------------------------------------------------------------------------------------
def test_data_formats(saved, tmp_path):
    import datasets

    texts = pydoc_paragraphs(60)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "sts.csv").write_text(
        "".join(STS_LINE.format(score=i % 5, a=t[:80], b=t[-80:]) for i, t in enumerate(texts))
    )
    assert read_documents(tmp_path / "d.jsonl") == (texts, "jsonl")
    assert read_documents(tmp_path / "ds") == (texts, "datasets")
    sts, kind = read_documents(tmp_path / "sts.csv")
    assert kind == "sts" and len(sts) == 2 * len(texts)
    tokenizer = load_tokenizer(saved / "llama")
    data = prepare_data(tokenizer, tmp_path / "ds", causal=True, seq_len=32, held_out=3, limit=None)
    assert all(t.shape == (32,) for t in data.train + data.held_out) and len(data.held_out) == 3
    sentences = prepare_data(tokenizer, tmp_path / "sts.csv", causal=False, seq_len=16, held_out=5, limit=10)
    assert len(sentences.train) == 10 and max(t.numel() for t in sentences.train) <= 16
    assert sentences.held_out_texts[-1] == texts[-1][-80:]


# ---- healing runs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_heal_lowers_the_loss_and_writes_a_loadable_model(capsys, saved, tmp_path, model):
    out = tmp_path / "healed"
    code, stdout, err = run(capsys, *heal_args(saved, model, out, "--lr", "3e-3", "--stage", "e2e", "--json"))
    assert code == 0, err
    report = json.loads(stdout)
    losses = [entry["loss"] for entry in json.loads((out / "heal.json").read_text())["log_history"] if "loss" in entry]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    metric = "kl" if model == "llama" else "cosine"
    before, after = report["fidelity_before"][f"before_{metric}"], report["fidelity_after"][f"after_{metric}"]
    assert (after < before) if metric == "kl" else (after > before)
    assert report["steps"] == 8 and not (tmp_path / "healed.checkpoints").exists()
    healed = layerfold.load(out)
    assert healed.base_model.layerfold_shared is not None
    from transformers import AutoModel, AutoModelForCausalLM

    auto = (AutoModelForCausalLM if model == "llama" else AutoModel).from_pretrained(out)
    ids = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        expected, got = healed(input_ids=ids), auto(input_ids=ids)
    key = "logits" if model == "llama" else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(expected, key))
    heal_md = (out / "heal.md").read_text()
    assert "Losses over time" in heal_md and re.search(rf"\| 8 +\| {losses[-1]:.4g} +\|", heal_md)
    # Progress is one bar with figures in its postfix: no printed log dictionaries, no summary line.
    assert "{'loss'" not in err and "'train_runtime'" not in err and "heal: 100%" in err
    card = (out / "README.md").read_text()
    assert "trained further" in card and "healed by" in card


def test_train_relax_changes_only_the_relaxations(capsys, saved, tmp_path):
    out = tmp_path / "healed"
    code, _, err = run(capsys, *heal_args(saved, "llama", out, "--train", "relax", "--lr", "1e-2"))
    assert code == 0, err
    before, after = load_file(saved / "llama-tied" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]) != ("lora_" in name), name


@pytest.mark.parametrize("stage", ["e2e", "blockwise"])
def test_a_mos_fold_heals_its_pools_and_cores_and_keeps_its_index_maps(capsys, saved, tmp_path, stage):
    """heal --train relax trains a pooled form's pools and cores, whatever the stage; the index maps are
    integers that never train and come back as they were."""
    folded = tmp_path / "llama-mos"
    code, _, err = run(capsys, "fold", saved / "llama", "--out", folded, "--strategy", "cycle", "--unique", "2",
                       "--rank", "4", "--relax", "mos", "--mos-pool", "8", "--mos-shard", "2")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "healed"
    args = heal_args(saved, "llama", out, "--train", "relax", "--lr", "1e-2", "--stage", stage)
    args[1] = folded
    code, _, err = run(capsys, *args)
    assert code == 0, err
    before, after = load_file(folded / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and any("mos_index_a" in name for name in before)
    for name in before:
        trained = "mos_core" in name or "mos_pool" in name
        assert torch.equal(before[name], after[name]) != trained, name
    layerfold.load(out)


@pytest.mark.parametrize("stage", ["e2e", "blockwise"])
def test_a_pruned_fold_heals_and_still_exports_narrow(capsys, saved, tmp_path, stage):
    """A width-pruned fold heals like any other (its smaller projections train, their shapes stay) and its
    healed checkpoint still exports as the smaller plain architecture."""
    folded = tmp_path / "llama-pruned"
    code, _, err = run(capsys, "fold", saved / "llama", "--out", folded, "--method", "prune", "--keep-blocks", "0.7",
                       "--calib", saved / "text.txt", "--uniform", "--multiple-of", "8")  # fmt: skip
    assert code == 0, err
    out = tmp_path / "healed"
    args = heal_args(saved, "llama", out, "--lr", "1e-2", "--stage", stage)
    args[1] = folded
    code, _, err = run(capsys, *args)
    assert code == 0, err
    before, after = load_file(folded / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(before[n].shape == after[n].shape for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before if "down_proj" in n)
    layerfold.export(out, tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["model_type"] == "llama" and plain["intermediate_size"] < 128


_KILL_AT_SAVE = """
import os, signal, sys
from transformers import TrainerCallback
from layerfold.heal import HealConfig, heal

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

student, teacher, data, out = sys.argv[1:5]
config = HealConfig(steps=8, batch=4, seq_len=64, eval_examples=4, save_every=4, lr=3e-3)
heal(student, teacher, data, out, config, callbacks=[KillAfterSave()])
"""


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(capsys, saved, tmp_path):
    common = ["--lr", "3e-3", "--save-every", "4", "--json"]
    code, stdout, err = run(capsys, *heal_args(saved, "llama", tmp_path / "straight", *common))
    assert code == 0, err
    straight = json.loads(stdout)

    killed = tmp_path / "resumed"
    result = subprocess.run(
        [sys.executable, "-c", _KILL_AT_SAVE, saved / "llama-tied", saved / "llama", saved / "text.txt", killed],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert not killed.exists() and (tmp_path / "resumed.checkpoints" / "checkpoint-4").is_dir()

    code, _, err = run(capsys, *heal_args(saved, "llama", killed, *common))  # without --resume: refused
    assert code == 2 and "--resume" in err and not killed.exists()
    code, stdout, err = run(capsys, *heal_args(saved, "llama", killed, *common, "--resume"))
    assert code == 0, err
    resumed = json.loads(stdout)
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 8
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-3)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_accelerate_launch_two_processes(saved, tmp_path):
    """Two DDP processes on the CPU (gloo). ``accelerate launch --cpu --num_processes 2`` starts one process only
    (accelerate's simple launcher; huggingface/accelerate#2741), so the two are launched with --multi_gpu, which
    on a machine without GPUs runs torch.distributed with gloo."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    args = [str(a) for a in heal_args(saved, "llama", out, "--steps", "4", "--batch", "2")]
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "layerfold",
            *args,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # printed once, by the main process
    assert report["processes"] == 2 and report["steps"] == 4
    # Each step sees 2 processes x 2 examples x 64 tokens.
    assert report["tokens_this_run"] == 4 * 2 * 2 * 64
    assert json.loads((out / "heal.json").read_text())["processes"] == 2
    layerfold.load(out)


def test_teacher_cache_is_reused(capsys, saved, tmp_path):
    extra = ["--teacher-cache", tmp_path / "cache", "--top-k", "16", "--json", "--steps", "4"]
    code, first, err = run(capsys, *heal_args(saved, "llama", tmp_path / "a", *extra))
    assert code == 0, err
    code, second, err = run(capsys, *heal_args(saved, "llama", tmp_path / "b", *extra))
    assert code == 0, err
    first, second = json.loads(first), json.loads(second)
    assert first["teacher_cache"]["hit"] is False and second["teacher_cache"]["hit"] is True
    assert first["teacher_cache"]["file"] == second["teacher_cache"]["file"]
    assert second["final_train_loss"] == pytest.approx(first["final_train_loss"], rel=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_teachers(saved):
    """A teacher of another vocabulary (the tiny llama with its own 128 tokens)."""
    build_tiny("llama").save_pretrained(saved / "llama-vocab128")
    return saved


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty data", "data file is empty"),
        ("missing data", "data file not found"),
        ("missing teacher", "teacher not found"),
        ("teacher of another architecture", "the teacher is a BertModel"),
        ("teacher of another vocabulary", "vocabulary"),
        ("folded teacher", "is a folded model"),
        ("not a folded student", "not a layerfold checkpoint"),
        ("relax on a dropped model", "nothing to train"),
        ("too little data", "too little data"),
        ("unknown loss", "unknown loss"),
        ("cache with an encoder", "kl loss only"),
        ("bad layer", "--hidden-layers"),
    ],
)
def test_bad_input_gives_one_line(capsys, other_teachers, tmp_path, case, message):
    saved = other_teachers
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("Only a few words here.\n")
    student, teacher, data, extra = saved / "llama-tied", saved / "llama", saved / "text.txt", []
    if case == "empty data":
        data = tmp_path / "empty.txt"
    elif case == "missing data":
        data = tmp_path / "nothing.txt"
    elif case == "missing teacher":
        teacher = tmp_path / "no-model"
    elif case == "teacher of another architecture":
        teacher = saved / "bert"
    elif case == "teacher of another vocabulary":
        teacher = saved / "llama-vocab128"
    elif case == "folded teacher":
        teacher = saved / "llama-tied"
    elif case == "not a folded student":
        student = saved / "llama"
    elif case == "relax on a dropped model":
        student, extra = saved / "llama-dropped", ["--train", "relax"]
    elif case == "too little data":
        data = tmp_path / "tiny.txt"
    elif case == "unknown loss":
        extra = ["--loss", "mse=1"]
    elif case == "cache with an encoder":
        student, teacher, extra = saved / "bert-tied", saved / "bert", ["--teacher-cache", tmp_path / "c"]
    elif case == "bad layer":
        extra = ["--loss", "kl=1,hidden=1", "--hidden-layers", "7"]
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "heal",
        student,
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "2",
        "--seq-len",
        "64",
        *extra,
    )
    assert code == 2, (stdout, err)
    lines = [line for line in err.splitlines() if line.startswith("layerfold: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()


def test_existing_output_is_kept_without_overwrite(capsys, saved, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, *heal_args(saved, "llama", out))
    assert code == 2 and "--overwrite" in err and (out / "mine.txt").read_text() == "keep me"


def test_healed_model_keeps_the_folded_models_dtype(capsys, saved, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(saved / "llama", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / "llama" / name, tmp_path / "bf16" / name)
    assert (
        main(
            [
                "fold",
                str(tmp_path / "bf16"),
                "--strategy",
                "cycle",
                "--unique",
                "2",
                "--rank",
                "4",
                "--out",
                str(tmp_path / "folded"),
            ]
        )
        == 0
    )
    assert {t.dtype for t in load_file(tmp_path / "folded" / "model.safetensors").values()} == {torch.bfloat16}
    code, _, err = run(
        capsys,
        "heal",
        tmp_path / "folded",
        "--teacher",
        tmp_path / "bf16",
        "--data",
        saved / "text.txt",
        "--out",
        tmp_path / "healed",
        "--steps",
        "2",
        "--seq-len",
        "64",
    )
    assert code == 0, err
    assert {t.dtype for t in load_file(tmp_path / "healed" / "model.safetensors").values()} == {torch.bfloat16}
