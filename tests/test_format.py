"""Files written by earlier versions still load: a folded checkpoint and a plan file in layerfold 0.1.0's format
(tests/fixtures/format-0.1.0, written by tests/fixtures/make_format_fixture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import layerfold
from layerfold import FoldPlan
from layerfold.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "format-0.1.0"


def test_a_checkpoint_in_the_0_1_0_format_loads_with_the_same_outputs(tmp_path):
    model = layerfold.load(FIXTURE / "llama")
    expected = load_file(FIXTURE / "expected.safetensors")
    inputs = {"input_ids": expected["input_ids"], "attention_mask": torch.ones_like(expected["input_ids"])}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-3, atol=1e-3)
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
    assert plan.groups == [[0, 2]] and plan.rank == 2 and plan.whiten is False
    assert plan.factors == [{"layers": [1, 3], "projection": "self_attn.q_proj", "rank": 8}]
    assert plan.kept_layers() == [0, 1, 2, 3]
