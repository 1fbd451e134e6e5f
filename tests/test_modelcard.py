"""Model cards in folded and exported folders, `layerfold info` on plain and folded folders, and fold --dtype."""

import json
import re

import torch
from conftest import build_tiny
from safetensors import safe_open
from test_cli import assert_one_line_error, run

import layerfold
from layerfold.checkpoints.modelcard import front_matter

ORIGINAL_CARD = "---\nlicense: apache-2.0\nbase_model: someone/tiny-llama\n---\n# tiny llama\n"


def original(tmp_path):
    source = tmp_path / "original"
    build_tiny("llama").save_pretrained(source)
    (source / "README.md").write_text(ORIGINAL_CARD)
    return source


def test_fold_and_export_write_a_model_card_that_carries_the_license(capsys, tmp_path):
    source = original(tmp_path)
    code, _, err = run(capsys, "fold", source, "--out", tmp_path / "folded", "--strategy", "cycle", "--unique", "2")
    assert code == 0, err
    card = (tmp_path / "folded" / "README.md").read_text()
    fields = front_matter(tmp_path / "folded")
    assert fields["license"] == "apache-2.0" and fields["base_model"] == "someone/tiny-llama"
    assert "- layerfold" in card and "- tie" in card
    assert "4 layers -> 4 kept, 2 unique blocks" in card  # the plan, as plan.describe() says it
    assert "original unique parameters" in card and re.search(r"kept: block parameters \| 50\.\d%", card)
    assert card.count("# folded\n") == 1  # titled by the folder's final name
    assert "import layerfold" in card and "needs layerfold" in card

    code, _, err = run(capsys, "export", tmp_path / "folded", "--out", tmp_path / "plain")
    assert code == 0, err
    exported = (tmp_path / "plain" / "README.md").read_text()
    assert front_matter(tmp_path / "plain")["license"] == "apache-2.0"
    assert "- layerfold-export" in exported and "every kept layer stored in full" in exported
    assert "transformers alone" in exported


def test_a_drop_only_export_card_says_it_is_the_base_architecture_with_fewer_layers(capsys, tmp_path):
    source = original(tmp_path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"num_layers": 4, "operations": [{"op": "drop", "layers": [1, 2]}]}))
    assert run(capsys, "fold", source, "--out", tmp_path / "folded", "--plan", plan)[0] == 0
    assert run(capsys, "export", tmp_path / "folded", "--out", tmp_path / "plain")[0] == 0
    assert "the base architecture with 2 of its 4 layers" in (tmp_path / "plain" / "README.md").read_text()


def test_save_pretrained_does_not_replace_the_users_own_readme(tmp_path):
    model = layerfold.load_source(original(tmp_path))
    layerfold.fold(model, layerfold.FoldPlan.cycle(4, 2), progress=False)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == "my notes"
    model.save_pretrained(tmp_path / "fresh")
    assert "- layerfold" in (tmp_path / "fresh" / "README.md").read_text()


def test_info_says_whether_a_folder_needs_layerfold_and_why(capsys, tmp_path):
    source = original(tmp_path)
    assert run(capsys, "fold", source, "--out", tmp_path / "folded", "--strategy", "cycle", "--unique", "2")[0] == 0
    assert run(capsys, "export", tmp_path / "folded", "--out", tmp_path / "plain")[0] == 0
    reports = {}
    for name in ("folded", "plain", "original"):
        code, out, err = run(capsys, "info", tmp_path / name, "--json")
        assert code == 0, err
        reports[name] = json.loads(out)
    assert reports["folded"]["needs_layerfold"] and "model type is layerfold" in reports["folded"]["why"]
    assert "tied or factorised projections" in reports["folded"]["why"]
    assert not reports["plain"]["needs_layerfold"] and "exported by layerfold" in reports["plain"]["why"]
    assert not reports["original"]["needs_layerfold"] and reports["original"]["why"] == "a plain llama checkpoint"
    assert reports["original"]["parameters"]["total"] > reports["folded"]["parameters"]["total"]
    code, out, _ = run(capsys, "info", tmp_path / "folded")
    assert re.search(r"\| loads with +\| layerfold", out)
    assert_one_line_error(*run(capsys, "info", tmp_path / "nowhere")[::2], "nowhere")


def test_fold_dtype_saves_the_fold_in_that_dtype(capsys, tmp_path):
    source = original(tmp_path)
    code, _, err = run(capsys, "fold", source, "--out", tmp_path / "half", "--strategy", "cycle", "--unique", "2",
                       "--dtype", "bf16")  # fmt: skip
    assert code == 0, err
    with safe_open(tmp_path / "half" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert layerfold.load(tmp_path / "half").dtype == torch.bfloat16
    code, _, err = run(capsys, "fold", source, "--out", tmp_path / "x", "--strategy", "cycle", "--unique", "2",
                       "--dtype", "fp8")  # fmt: skip
    assert_one_line_error(code, err, "'--dtype': Value error, 'fp8' is not one of 'fp32', 'fp16', 'bf16'")
    assert not (tmp_path / "x").exists()
