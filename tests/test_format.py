"""Files written by earlier versions still load: a folded checkpoint and a plan file in layerfold 0.1.0's format
(tests/fixtures/format-0.1.0, written by tests/fixtures/make_format_fixture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import layerfold
from layerfold import FoldPlan
from layerfold.cli.commands import main
from layerfold.operations import Factor, Tie

FIXTURE = Path(__file__).parent / "fixtures" / "format-0.1.0"


def test_a_checkpoint_in_the_0_1_0_format_loads_with_the_same_outputs(tmp_path):
    model = layerfold.load(FIXTURE / "llama")
    expected = load_file(FIXTURE / "expected.safetensors")
    inputs = {"input_ids": expected["input_ids"], "attention_mask": torch.ones_like(expected["input_ids"])}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.float16
    # The fixture's logits were computed by an earlier transformers; its fp16 kernels round differently (up to
    # 3e-3 here with transformers 5.24, torch 2.13), so the check is to fp16 rounding, not bit for bit.
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-2, atol=1e-2)
    # Saved again and reloaded, it gives the same outputs bit for bit.
    model.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(layerfold.load(tmp_path / "again")(**inputs).logits, logits)


def test_info_on_a_0_1_0_checkpoint(capsys):
    assert main(["info", str(FIXTURE / "llama"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 4 and info["unique_blocks"] == 3 and info["layerfold_version"] == "0.1.0"


def test_a_plan_file_in_the_0_1_0_schema_loads():
    plan = FoldPlan.load(FIXTURE / "plan.yaml")
    assert plan.operations == [
        Tie(layers=[0, 2], sources=[0, 2], rank=2),
        Factor(layers=[1, 3], projection="self_attn.q_proj", rank=8, whiten=False),
    ]
    assert plan.kept_layers() == [0, 1, 2, 3] and plan.provenance == {"note": "fixture of the 0.1.0 format"}


def test_the_store_is_keyed_by_operation_and_the_format_is_recorded(tmp_path):
    model = layerfold.load(FIXTURE / "llama")
    model.save_pretrained(tmp_path / "now")
    names = set(load_file(tmp_path / "now" / "model.safetensors"))
    assert "model.layerfold_shared.tie_0.self_attn.q_proj.weight" in names
    assert "model.layerfold_shared.factor_0.weight" in names
    assert not any(".layerfold_shared.0." in n or ".layerfold_shared.1." in n for n in names)
    config = json.loads((tmp_path / "now" / "config.json").read_text())
    assert config["layerfold_format"] == 2 and config["fold_plan"]["operations"][0]["op"] == "tie"
    assert layerfold.core.tensor_files.read_metadata(tmp_path / "now")["layerfold_format"] == "2"


def test_a_checkpoint_of_a_newer_format_is_one_clear_line(tmp_path, capsys):
    import shutil

    folder = tmp_path / "future"
    shutil.copytree(FIXTURE / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layerfold_format": 3}))
    assert main(["info", str(folder)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint format 3 by a newer layerfold" in err and "upgrade" in err
