"""The README's examples are true: its Python blocks run unchanged (on a tiny saved model standing in for
"path/to/hf-model", and an offline Hub cache for the Hub id), its plan file reads as a plan, and every flag its
command synopses show is one the command takes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_with_tokenizer

import layerfold
from layerfold.cli.commands import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text(encoding="utf-8")) if lang == language]


def test_the_python_examples_run_unchanged(tmp_path):
    """The quick start (fold, save, load, export), the Auto classes (a Hub id from an offline cache), PEFT on
    the fold, and the family registration, in one process, in the order the README gives them."""
    python = blocks("python")
    assert len(python) == 4, "a Python block was added or removed: run it here too"
    quick_start, auto_classes, peft_on_a_fold, family = python
    original = save_tiny_with_tokenizer(tmp_path / "models", names=("llama",)) / "llama"
    work = tmp_path / "work"
    work.mkdir()
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    script = f"""
import shutil
from pathlib import Path
exec({quick_start.replace("path/to/hf-model", str(original))!r})
snapshot = Path({str(cache)!r}) / "models--someone--folded-model" / "snapshots" / {commit!r}
shutil.copytree("folded", snapshot)  # the Hub id resolves from the offline cache
(snapshot.parents[1] / "refs").mkdir()
(snapshot.parents[1] / "refs" / "main").write_text({commit!r})
exec({auto_classes!r})
assert type(model).__name__ == "LlamaForCausalLM" and type(classifier).__name__ == "LlamaForSequenceClassification"
exec({peft_on_a_fold!r})
import layerfold
assert type(layerfold.load("folded-tuned")).__name__ == "LlamaForCausalLM"
import layerfold.core.families
exec({family!r}, vars(layerfold.core.families))
print("ran")
"""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ran")
    assert (work / "plain" / "config.json").is_file() and (work / "adapter" / "adapter_config.json").is_file()
    shutil.rmtree(tmp_path / "models")


def test_the_plan_file_reads_as_a_plan():
    (plan_file,) = blocks("yaml")
    plan = layerfold.FoldPlan.from_yaml(plan_file)
    assert [op.kind for op in plan.operations] == ["merge", "tie", "factor", "factor", "drop"]
    assert plan.num_layers == 6 and plan.dropped() == [3, 5]


def synopses() -> dict[str, set[str]]:
    """Each command the README's bash blocks show, with every flag shown for it."""
    flags: dict[str, set[str]] = {}
    for body in blocks("bash"):
        for command in body.replace("\\\n", " ").splitlines():
            words = command.split("#")[0].split()
            words = [w for w in words if w != "--quiet"]
            if len(words) < 2 or words[0] != "layerfold" or words[1] == "COMMAND":
                continue
            found = re.findall(r"--[a-z][a-z0-9-]*", " ".join(words[2:]))
            flags.setdefault(words[1], set()).update(found)
    return flags


@pytest.mark.parametrize("command", sorted(synopses()))
def test_every_flag_the_readme_shows_is_taken(command, capsys):
    assert main([command, "--help"]) == 0
    shown = capsys.readouterr().out
    missing = sorted(flag for flag in synopses()[command] if not re.search(re.escape(flag) + r"\b", shown))
    assert not missing, f"README shows layerfold {command} {' '.join(missing)}, which it does not take"
