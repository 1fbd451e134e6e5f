"""Nothing lost, nothing run: the output guard of every writing command, no remote code, validated folded
checkpoints, standard saving of a fold, leftovers of killed runs, Ctrl-C. Each case of issue 15 is a test here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import outputs, sample_inputs, save_tiny_with_tokenizer
from safetensors.torch import load_file

import layerfold
from layerfold.cli.commands import main
from layerfold.jobs.demo import pydoc_paragraphs
from layerfold.core.errors import LayerfoldError
from layerfold.checkpoints.output_guard import OWNER_NAME, atomic_output_dir

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, message: str = "") -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("layerfold: error: ") and message in last, err


class RunsCode:
    """Pickled, it names os.system with a command that creates ``path``: what a crafted pickle file holds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes: what must be left untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``models/`` holding a tiny llama and bert with a real tokenizer, a user's thesis and a folded llama;
    calibration text and a plan file beside it."""
    root = tmp_path_factory.mktemp("safety")
    models = save_tiny_with_tokenizer(root / "models")
    (models / "thesis.txt").write_text("years of work")
    (root / "text.txt").write_text("\n\n".join(pydoc_paragraphs(300)))
    layerfold.FoldPlan.cycle(4, 2, rank=2).save(root / "plan.yaml")
    for name in ("llama", "bert"):
        code = main(["fold", str(models / name), "--out", str(models / f"{name}-folded"), "--plan", str(root / "plan.yaml")])
        assert code == 0
    return root


HEAL_FAST = ["--steps", "1", "--batch", "2", "--seq-len", "32", "--eval-examples", "2", "--save-every", "1"]


def _commands(world: Path, out: Path) -> dict[str, list]:
    """Every command that writes, with ``out`` as its output."""
    m = world / "models"
    text = world / "text.txt"
    return {
        "fold": ["fold", m / "llama", "--out", out, "--strategy", "cycle", "--unique", "2"],
        "fold-stream": ["fold", m / "llama", "--out", out, "--stream", "--strategy", "cycle", "--unique", "2"],
        "fold-method": ["fold", m / "llama", "--out", out, "--method", "svd", "--keep-blocks", "0.5", "--calib", text],
        "heal": ["heal", m / "llama-folded", "--teacher", m / "llama", "--data", text, "--out", out, *HEAL_FAST],
        "export": ["export", m / "llama-folded", "--out", out],
        "analyze": ["analyze", m / "llama", "--data", text, "--out", out, "--gate-steps", "0"],
        "compress": ["compress", m / "llama", "--data", text, "--out", out, "--keep-blocks", "0.5"],
    }


# ---- 1. --out containing, equal to or inside an input ---------------------------------------------------------
@pytest.mark.parametrize("command", ["fold", "fold-stream", "fold-method", "heal", "export", "analyze", "compress"])
@pytest.mark.parametrize("spelling", ["plain", "dotdot", "symlink"])
def test_out_that_contains_an_input_is_refused_and_nothing_is_touched(capsys, world, tmp_path, command, spelling):
    models = world / "models"
    out = {
        "plain": models,
        "dotdot": models / "llama" / "..",
        "symlink": tmp_path / "link",
    }[spelling]
    if spelling == "symlink":
        out.symlink_to(models)
    before = snapshot(models)
    code, _, err = run(capsys, *_commands(world, out)[command], "--overwrite")
    assert_one_line_error(code, err, "contains the")
    assert snapshot(models) == before


def test_heal_refuses_an_out_containing_the_teacher_or_the_data(capsys, world, tmp_path):
    teacher_home = tmp_path / "teachers"
    shutil.copytree(world / "models" / "llama", teacher_home / "llama")
    args = ["heal", world / "models" / "llama-folded", "--teacher", teacher_home / "llama", "--data"]
    code, _, err = run(capsys, *args, world / "text.txt", "--out", teacher_home, "--overwrite", *HEAL_FAST)
    assert_one_line_error(code, err, "contains the teacher")
    (teacher_home / "data.txt").write_text((world / "text.txt").read_text())
    args[3] = world / "models" / "llama"
    code, _, err = run(capsys, *args, teacher_home / "data.txt", "--out", teacher_home, "--overwrite", *HEAL_FAST)
    assert_one_line_error(code, err, "contains the data")
    assert (teacher_home / "llama" / "config.json").is_file() and (teacher_home / "data.txt").is_file()


@pytest.mark.parametrize("inside", ["model", "plan"])
def test_out_equal_to_or_inside_an_input_is_refused(capsys, world, tmp_path, inside):
    source = world / "models" / "llama"
    if inside == "model":
        args = ["fold", source, "--out", source / "sub", "--strategy", "cycle", "--unique", "2"]
        message = "lies inside the original model"
    else:
        args = ["fold", source, "--out", world / "plan.yaml", "--plan", world / "plan.yaml", "--overwrite"]
        message = "is the plan"
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, message)
    assert not (source / "sub").exists() and (world / "plan.yaml").is_file()


def test_export_onto_its_own_folded_model_is_refused(capsys, world):
    folded = world / "models" / "llama-folded"
    before = snapshot(folded)
    code, _, err = run(capsys, "export", folded, "--out", folded, "--overwrite")
    assert_one_line_error(code, err, "is the folded model")
    assert snapshot(folded) == before


def test_library_save_and_export_use_the_same_guard(world, tmp_path):
    model = layerfold.load_source(world / "models" / "llama")
    layerfold.fold(model, layerfold.FoldPlan.cycle(4, 2), progress=False)
    with pytest.raises(LayerfoldError, match="contains the original model"):
        layerfold.save(model, world / "models", source=world / "models" / "llama", overwrite=True)
    with pytest.raises(LayerfoldError, match="contains the folded model"):
        layerfold.export(world / "models" / "llama-folded", world / "models", overwrite=True)
    assert (world / "models" / "thesis.txt").read_text() == "years of work"


# ---- 2. --overwrite only over layerfold's own output ----------------------------------------------------------
@pytest.mark.parametrize("command", ["fold", "fold-stream", "heal", "export", "analyze", "compress"])
def test_overwrite_refuses_a_folder_of_someone_elses_files(capsys, world, tmp_path, command):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("call mum")
    code, _, err = run(capsys, *_commands(world, notes)[command], "--overwrite")
    assert_one_line_error(code, err, "holds files layerfold did not write ('todo.txt')")
    assert (notes / "todo.txt").read_text() == "call mum" and len(list(notes.iterdir())) == 1


def test_overwrite_replaces_its_own_output_and_an_empty_folder(capsys, world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for unique in ("2", "3"):  # first over an empty folder, then over its own output
        args = ["fold", world / "models" / "llama", "--out", out, "--strategy", "cycle", "--unique", unique]
        code, _, err = run(capsys, *args, "--overwrite")
        assert code == 0, err
    assert layerfold.load(out).config.num_hidden_layers == 4
    code, _, err = run(capsys, "export", out, "--out", tmp_path / "plain")
    assert code == 0, err
    code, _, err = run(capsys, "export", out, "--out", tmp_path / "plain", "--overwrite")  # export's own output
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]


def test_heal_onto_an_existing_file_is_refused_before_training(capsys, world, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    args = _commands(world, target)["heal"]
    start = time.perf_counter()
    code, _, err = run(capsys, *args, "--overwrite")
    assert_one_line_error(code, err, "exists and is not a folder")
    assert target.read_bytes() == b"mine" and time.perf_counter() - start < 30
    assert not (tmp_path / "model.bin.checkpoints").exists()


def test_heal_never_deletes_a_foreign_checkpoint_folder(capsys, world, tmp_path):
    (tmp_path / "out.checkpoints").mkdir()
    (tmp_path / "out.checkpoints" / "mine.txt").write_text("x")
    code, _, err = run(capsys, *_commands(world, tmp_path / "out")["heal"], "--overwrite")
    assert_one_line_error(code, err, "holds something else")
    assert (tmp_path / "out.checkpoints" / "mine.txt").is_file()


# ---- plan's files --------------------------------------------------------------------------------------------
def _plan(world: Path, out: Path, *extra) -> list:
    return ["plan", world / "models" / "llama", "--data", world / "text.txt", "--out", out, "--keep-blocks", "0.5",
            "--gate-steps", "0", "--allow", "drop", *extra]  # fmt: skip


def test_plan_refuses_to_replace_someone_elses_side_file(capsys, world, tmp_path):
    (tmp_path / "X.md").write_text("my notes")
    for extra in ((), ("--overwrite",)):
        code, _, err = run(capsys, *_plan(world, tmp_path / "X.yaml", *extra))
        assert_one_line_error(code, err, "X.md")
    assert (tmp_path / "X.md").read_text() == "my notes" and not (tmp_path / "X.yaml").exists()


def test_plan_writes_both_files_and_replaces_only_its_own(capsys, world, tmp_path):
    code, _, err = run(capsys, *_plan(world, tmp_path / "X.yaml"))
    assert code == 0, err
    assert layerfold.FoldPlan.load(tmp_path / "X.yaml").num_layers == 4
    assert (tmp_path / "X.md").read_text().startswith("<!-- written by layerfold -->")
    code, _, err = run(capsys, *_plan(world, tmp_path / "X.yaml"))
    assert_one_line_error(code, err, "already exists")
    code, _, err = run(capsys, *_plan(world, tmp_path / "X.yaml", "--overwrite"))
    assert code == 0, err
    (tmp_path / "Y.yaml").write_text("my: own yaml\n")
    code, _, err = run(capsys, *_plan(world, tmp_path / "Y.yaml", "--overwrite"))
    assert_one_line_error(code, err, "a file layerfold did not write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.md", "X.yaml", "Y.yaml"]


@pytest.mark.parametrize("name", ["README.yaml", "config.json"])
def test_plan_inside_the_source_is_refused(capsys, world, name):
    source = world / "models" / "llama"
    before = snapshot(source)
    code, _, err = run(capsys, *_plan(world, source / name, "--overwrite"))
    assert_one_line_error(code, err, "lies inside the original model")
    assert snapshot(source) == before


# ---- 3. no remote code ---------------------------------------------------------------------------------------
@pytest.fixture
def booby_trapped(world, tmp_path) -> tuple[Path, Path]:
    """A folded checkpoint whose modeling_layerfold.py and tokenizer code would each write a marker file."""
    folder = tmp_path / "from-a-stranger"
    shutil.copytree(world / "models" / "llama-folded", folder)
    marker = tmp_path / "MARKER"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (folder / "modeling_layerfold.py").write_text(payload + (folder / "modeling_layerfold.py").read_text())
    (folder / "tokenization_stranger.py").write_text(
        payload + "from transformers import BertTokenizer\nclass StrangerTokenizer(BertTokenizer):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_stranger.StrangerTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


def test_no_command_runs_code_from_the_folder(capsys, world, tmp_path, booby_trapped):
    folder, marker = booby_trapped
    m = world / "models"
    for args in (
        ["info", folder],
        ["eval", folder, "--task", "size"],
        ["eval", folder, "--task", "fidelity", "--reference", m / "llama", "--data", world / "text.txt",
         "--max-tokens", "64", "--max-length", "32"],  # fmt: skip
        ["eval", m / "llama", "--task", "fidelity", "--reference", folder, "--data", world / "text.txt",
         "--max-tokens", "64", "--max-length", "32"],  # fmt: skip
        ["export", folder, "--out", tmp_path / "plain"],
        ["heal", folder, "--teacher", m / "llama", "--data", world / "text.txt", "--out", tmp_path / "healed",
         *HEAL_FAST],  # fmt: skip
        ["fold", folder, "--out", tmp_path / "refolded", "--strategy", "cycle", "--unique", "2"],
    ):
        code, _, err = run(capsys, *args)
        assert code in (0, 2) and "Traceback" not in err, err
        assert not marker.exists(), f"{args[0]} ran the folder's code"
    layerfold.load(folder)
    layerfold.load_tokenizer(folder)
    assert not marker.exists()
    assert (tmp_path / "healed" / "model.safetensors").is_file()  # the commands worked without the code


# ---- 4. crafted configs --------------------------------------------------------------------------------------
def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["fold_plan"].update(num_layers=10**15),
        lambda c: (c["fold_plan"].update(num_layers=10**15), c["base_config"].update(num_hidden_layers=10**15)),
        lambda c: (c["fold_plan"].update(num_layers=10**6), c["base_config"].update(num_hidden_layers=10**6)),
        lambda c: c["base_config"].update(max_position_embeddings=10**12),
        lambda c: c["base_config"].update(hidden_size=10**9),
    ],
    ids=["plan-layers", "both-layers", "million-layers", "positions", "hidden"],
)
def test_an_oversized_config_is_refused_under_a_memory_limit(world, tmp_path, edit):
    folder = tmp_path / "crafted"
    shutil.copytree(world / "models" / "llama-folded", folder)
    _edit_config(folder, edit)
    limit = 6 * 1024**3  # address space: torch and transformers need about 2-3 GB of it
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d));"
        "from layerfold.cli.commands import main; sys.exit(main(['info', sys.argv[1]]))" % (limit, limit)
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, env=ENV, timeout=300)
    assert_one_line_error(result.returncode, result.stderr)
    assert time.perf_counter() - start < 120


def test_base_architecture_is_only_one_of_the_familys_model_classes(world, tmp_path, monkeypatch):
    import transformers

    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a))
    for name in ("pipeline", "AutoModel", "BertModel", "os", "LlamaForCausalLM.__init__"):
        folder = tmp_path / f"arch-{len(called)}-{name.replace('.', '_')}"
        shutil.copytree(world / "models" / "llama-folded", folder)
        _edit_config(folder, lambda c: c.update(base_architecture=name))
        with pytest.raises(LayerfoldError, match="is not a llama model class"):
            layerfold.load(folder)
    assert not called


# ---- 6. damaged checkpoints: one line each -------------------------------------------------------------------
def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _edit_header(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    header, data = _header(file)
    edit(header)
    _write_header(file, header, data)


def _set_aliases(value):
    return lambda h: h["__metadata__"].update(layerfold_aliases=value)


def _a_stored_name(header: dict) -> str:
    return next(k for k in header if k != "__metadata__" and "layers.0." in k)


def _shard(folder: Path, weight_map_edit=None, index_text=None) -> None:
    """Turn the single file into one shard with an index, then damage the index."""
    file = folder / "model.safetensors"
    header, _ = _header(file)
    shard = "model-00001-of-00001.safetensors"
    file.rename(folder / shard)
    weight_map = {k: shard for k in header if k != "__metadata__"}
    index = {"metadata": header["__metadata__"], "weight_map": weight_map}
    if weight_map_edit:
        weight_map_edit(weight_map)
    (folder / "model.safetensors.index.json").write_text(index_text if index_text is not None else json.dumps(index))


def _truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _outside_shard(folder: Path) -> None:
    shutil.copy(folder / "model.safetensors", folder.parent / "elsewhere.safetensors")
    _shard(folder, lambda m: m.update({k: "../elsewhere.safetensors" for k in m}))


def _same_shape_alias(h: dict) -> None:
    # An alias under the name of a stored tensor of the same shape would silently stand in for it.
    names = [k for k in h if k != "__metadata__" and h[k]["shape"] == h[_a_stored_name(h)]["shape"]]
    h["__metadata__"]["layerfold_aliases"] = json.dumps({names[0]: names[1]})


DAMAGES = {
    "truncated": _truncate,
    "garbage-file": lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 7),
    "header-length": lambda f: (f / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**62) + (f / "model.safetensors").read_bytes()[8:]
    ),
    "corrupt-header": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:8] + b"{not json" + (f / "model.safetensors").read_bytes()[17:]
    ),
    "shape-out-of-range": lambda f: _edit_header(
        f, lambda h: h[_a_stored_name(h)].update(shape=[10**12, 10**12])
    ),
    "aliases-not-json": lambda f: _edit_header(f, _set_aliases("{oops")),
    "aliases-a-list": lambda f: _edit_header(f, _set_aliases("[1, 2]")),
    "alias-to-missing": lambda f: _edit_header(f, _set_aliases(json.dumps({"lm_head.weight": "no.such.tensor"}))),
    "alias-over-stored": lambda f: _edit_header(f, _same_shape_alias),
    "no-fold-plan": lambda f: _edit_config(f, lambda c: c.pop("fold_plan")),
    "no-base-config": lambda f: _edit_config(f, lambda c: c.pop("base_config")),
    "base-config-a-list": lambda f: _edit_config(f, lambda c: c.update(base_config=[1])),
    "plan-layer-out-of-range": lambda f: _edit_config(f, lambda c: c["fold_plan"]["operations"][0].update(layers=[0, 9])),
    "plan-more-layers": lambda f: _edit_config(f, lambda c: c["fold_plan"].update(num_layers=6)),
    "plan-drops-layers-the-weights-hold": lambda f: _edit_config(
        f, lambda c: c["fold_plan"]["operations"].append({"op": "drop", "layers": [1, 3]})
    ),
    "rank-beyond-shape": lambda f: _edit_config(f, lambda c: c["fold_plan"]["operations"][0].update(rank=10**9)),
    "unknown-operation": lambda f: _edit_config(f, lambda c: c["fold_plan"]["operations"].append({"op": "mos"})),
    "future-format": lambda f: _edit_config(f, lambda c: c.update(layerfold_format=3)),
    "non-numeric-size": lambda f: _edit_config(f, lambda c: c["base_config"].update(hidden_size="sixty-four")),
    "config-not-json": lambda f: (f / "config.json").write_text("{"),
    "index-not-json": lambda f: _shard(f, index_text="{nope"),
    "index-missing-shard": lambda f: _shard(f, lambda m: m.update({k: "model-00009-of-00009.safetensors" for k in m})),
    "index-outside-folder": _outside_shard,
    "no-weights": lambda f: (f / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_one_line(capsys, world, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(world / "models" / "llama-folded", folder)
    DAMAGES[damage](folder)
    with pytest.raises(LayerfoldError):
        layerfold.load(folder)
    for args in (["info", folder], ["eval", folder, "--task", "size"], ["export", folder, "--out", tmp_path / "x"]):
        code, _, err = run(capsys, *args)
        assert_one_line_error(code, err)
    assert not (tmp_path / "x").exists()


def _pickled_optimizer(checkpoint: Path) -> None:
    torch.save({"state": RunsCode(checkpoint.parents[1] / "ran"), "param_groups": []}, checkpoint / "optimizer.pt")


@pytest.mark.parametrize("damage, message", [(_truncate, "is damaged"), (_pickled_optimizer, "not plain tensors")],
                         ids=["truncated-weights", "pickled-optimizer"])  # fmt: skip
def test_a_damaged_checkpoint_under_heal_resume_is_one_line(capsys, world, tmp_path, damage, message):
    out = tmp_path / "healed"
    args = _commands(world, out)["heal"][:-2] + ["--steps", "2", "--keep-checkpoints"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    damage(tmp_path / "healed.checkpoints" / "checkpoint-2")
    code, _, err = run(capsys, *args, "--resume", "--overwrite")
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "ran").exists()  # nothing was unpickled


def test_other_bad_files_and_options_are_one_line(capsys, world, tmp_path):
    m = world / "models"
    (tmp_path / "fake.gguf").write_bytes(b"GGUF but not really" * 10)
    fake_dataset = tmp_path / "dataset"
    fake_dataset.mkdir()
    (fake_dataset / "state.json").write_text("{")
    odd = tmp_path / "odd-config"
    shutil.copytree(m / "llama", odd)
    _edit_config(odd, lambda c: c.update(hidden_size="lots"))
    for args, message in (
        (["fold", tmp_path / "fake.gguf", "--out", tmp_path / "a", "--strategy", "cycle", "--unique", "2"], "GGUF"),
        (["fold", m / "llama", "--out", tmp_path / "b", "--strategy", "cycle", "--unique", "2",
          "--max-shard-size", "inf"], "--max-shard-size"),  # fmt: skip
        (["analyze", m / "llama", "--data", fake_dataset, "--out", tmp_path / "c"], "not a datasets folder"),
        (["fold", odd, "--out", tmp_path / "d", "--strategy", "cycle", "--unique", "2"], "hidden_size"),
        (["eval", m / "bert", "--task", "sts", "--data", world / "text.txt"], "not an STS-B file"),
    ):
        code, _, err = run(capsys, *args)
        assert_one_line_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "fake.gguf", "odd-config"]


# ---- 5. standard saving of a loaded fold ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("how", ["save_pretrained", "trainer", "auto-class", "remote-code"])
def test_standard_saving_of_a_fold_reloads_bit_identically(world, tmp_path, name, how):
    import transformers

    folded = world / "models" / f"{name}-folded"
    model = layerfold.load(folded)
    if how in ("auto-class", "remote-code"):
        auto = transformers.AutoModelForCausalLM if name == "llama" else transformers.AutoModel
        model = auto.from_pretrained(folded, **({"trust_remote_code": True} if how == "remote-code" else {}))
    inputs = sample_inputs()
    reference = outputs(model, inputs)
    target = tmp_path / "saved"
    if how == "trainer":
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True)
        transformers.Trainer(model=model, args=args).save_model(str(target))
    else:
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"an earlier save")  # replaced, never mixed in
        model.save_pretrained(target)
    again = layerfold.load(target)
    assert torch.equal(outputs(again, inputs), reference)
    for stored, tensor in load_file(folded / "model.safetensors").items():
        assert torch.equal(load_file(target / "model.safetensors")[stored], tensor)


def test_sentence_transformers_save_of_a_fold_reloads_bit_identically(world, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    module = Transformer(str(world / "models" / "bert"))
    module.model = layerfold.load(world / "models" / "bert-folded")  # the folded encoder in place of the original
    encoder = SentenceTransformer(modules=[module, Pooling(module.get_word_embedding_dimension(), "mean")])
    sentences = ["a folded model keeps its weights", "saving must not lose them"]
    reference = encoder.encode(sentences, convert_to_tensor=True)
    encoder.save(str(tmp_path / "st"))
    for remote_code in (False, True):
        reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=remote_code, local_files_only=True)
        assert torch.equal(reloaded.encode(sentences, convert_to_tensor=True), reference)
    reloaded.save(str(tmp_path / "st-again"))  # a fold loaded by SentenceTransformer saves as a fold again
    again = SentenceTransformer(str(tmp_path / "st-again"), local_files_only=True)
    assert torch.equal(again.encode(sentences, convert_to_tensor=True), reference)
    assert torch.equal(outputs(layerfold.load(tmp_path / "st"), sample_inputs()), outputs(module.model, sample_inputs()))


def test_saving_part_of_a_folded_decoder_is_refused(world, tmp_path):
    model = layerfold.load(world / "models" / "llama-folded")
    with pytest.raises(LayerfoldError, match="part of a folded LlamaForCausalLM"):
        model.base_model.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    plain = layerfold.materialize(layerfold.load(world / "models" / "llama-folded"))
    plain.save_pretrained(tmp_path / "plain")  # materialised: a plain checkpoint again
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "llama"


# ---- 7. leftovers, late failures, long names, Ctrl-C ---------------------------------------------------------
_KILLED_WRITE = """
import os, signal, sys
from layerfold.checkpoints.output_guard import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(capsys, world, tmp_path):
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITE, tmp_path / "first"], env=ENV, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(leftovers) == 1 and (leftovers[0] / OWNER_NAME).is_file()
    code, _, err = run(capsys, "fold", world / "models" / "llama", "--out", tmp_path / "second", "--strategy",
                       "cycle", "--unique", "2")  # fmt: skip
    assert code == 0, err
    assert f"removed {leftovers[0]}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second"]


def test_a_write_that_is_still_running_is_not_cleaned(tmp_path):
    with atomic_output_dir(tmp_path / "a") as first:
        with atomic_output_dir(tmp_path / "b"):
            assert first.is_dir()  # this process still owns it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_run_killed_mid_swap_gets_its_earlier_output_back(capsys, world, tmp_path):
    code, _, _ = run(capsys, "fold", world / "models" / "llama", "--out", tmp_path / "out", "--strategy", "cycle",
                     "--unique", "2")  # fmt: skip
    assert code == 0
    # What a SIGKILL between the two renames leaves: the output moved aside, the new one not yet in place.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = tmp_path / ".layerfold-0badf00d.partial"
    partial.mkdir()
    (partial / OWNER_NAME).write_text(json.dumps({"target": "out", "pid": int(dead.stdout), "host": socket.gethostname()}))
    (tmp_path / "out").rename(tmp_path / ".layerfold-0badf00d.old")
    code, _, err = run(capsys, "fold", world / "models" / "llama", "--out", tmp_path / "next", "--strategy", "cycle",
                       "--unique", "2")  # fmt: skip
    assert code == 0 and "restored" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next", "out"]
    layerfold.load(tmp_path / "out")


_KILLED_SWAP = """
import os, signal, sys
from layerfold.checkpoints.output_guard import atomic_output_dir
real_replace = os.replace

def replace(src, dst):
    if str(src).endswith(".partial"):  # the second rename of the swap: the new output into place
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_a_swap_killed_between_its_renames_is_restored_by_the_next_run(capsys, world, tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "earlier.txt").write_text("earlier")
    result = subprocess.run([sys.executable, "-c", _KILLED_SWAP, out], env=ENV, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not out.exists()  # moved aside; the new output never arrived
    fold = ["fold", world / "models" / "llama", "--out", out, "--strategy", "cycle", "--unique", "2"]
    code, _, err = run(capsys, *fold)  # the same --out: the earlier output is back first, so it is not replaced
    assert f"restored {out}" in err
    assert_one_line_error(code, err, "already exists")
    assert (out / "earlier.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    code, _, err = run(capsys, *fold, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / OWNER_NAME).exists()
    layerfold.load(out)


def test_a_failed_swap_puts_the_earlier_output_back(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "first.txt").write_text("1")
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(LayerfoldError, match="No space left"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "second.txt").write_text("2")
    assert (out / "first.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_long_output_name_works(capsys, world, tmp_path):
    out = tmp_path / ("m" * 245)
    code, _, err = run(capsys, "fold", world / "models" / "llama", "--out", out, "--strategy", "cycle", "--unique", "2")
    assert code == 0, err
    assert layerfold.load(out).config.num_hidden_layers == 4


_KILLED_COMPRESS = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
import transformers
transformers.Trainer.train = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-heal
from layerfold.cli.commands import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_compress_killed_while_healing_leaves_only_its_temporary_folder(capsys, world, tmp_path):
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    args = _commands(world, tmp_path / "small")["compress"] + ["--heal-steps", "2", "--gate-steps", "0"]
    args += ["--calib-tokens", "2048", "--allow", "drop"]
    result = subprocess.run([sys.executable, "-c", _KILLED_COMPRESS, scratch, *map(str, args)], env=ENV, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert list(scratch.iterdir()) == []  # no scratch model in the system temp folder
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "system-tmp")
    assert len(left) == 1 and left[0].startswith(".layerfold-") and left[0].endswith(".partial"), left
    assert (tmp_path / left[0] / ".work" / "healed.checkpoints").is_dir()  # the heal's checkpoints were inside it
    code, _, err = run(capsys, *_commands(world, tmp_path / "next")["fold"])
    assert code == 0 and "removed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["next", "system-tmp"]


def test_ctrl_c_while_starting_is_one_line_and_exit_130(world):
    for delay in (0.3, 1.0, 2.5, 5.0):  # while typer, torch and transformers import, and while the model loads
        process = subprocess.Popen(
            [sys.executable, "-m", "layerfold", "info", world / "models" / "llama-folded"],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ENV,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if process.returncode == 0:
            continue  # finished before the signal
        assert process.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "layerfold: interrupted"


def test_sigterm_is_handled_like_ctrl_c(world, tmp_path):
    """SIGTERM while starting and while writing: one line, exit 143, no temporary folder left."""
    process = subprocess.Popen([sys.executable, "-m", "layerfold", "info", world / "models" / "llama-folded"],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True)  # fmt: skip
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    if process.returncode != 0:  # not finished before the signal
        assert process.returncode == 143 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "layerfold: terminated"
    out = tmp_path / "work" / "small"
    args = [str(a) for a in _commands(world, out)["compress"]] + ["--heal-steps", "400", "--gate-steps", "0",
                                                                   "--calib-tokens", "2048", "--allow", "drop"]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "layerfold", *args], stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=ENV, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(out.parent.glob(".layerfold-*.partial")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(out.parent.glob(".layerfold-*.partial")), "the run wrote no temporary folder"
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "layerfold: terminated"
    assert list(out.parent.iterdir()) == []


def test_bad_weights_of_an_original_model_are_one_line(capsys, world, tmp_path):
    m = world / "models"
    truncated, pickled = tmp_path / "truncated", tmp_path / "pickled"
    shutil.copytree(m / "llama", truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:5000])
    shutil.copytree(m / "llama", pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": RunsCode(tmp_path / "ran")}, pickled / "pytorch_model.bin")
    for folder, message in ((truncated, "cannot load model"), (pickled, "hold more than tensors")):
        code, _, err = run(capsys, "fold", folder, "--out", tmp_path / "x", "--strategy", "cycle", "--unique", "2")
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "x").exists()


def test_arguments_are_checked_before_any_model_loads(capsys, world, monkeypatch):
    import layerfold.checkpoints.folded
    import layerfold.jobs.evaluate
    import layerfold.jobs.fold
    import layerfold.jobs.info

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in ((layerfold.jobs.fold, "load_source"), (layerfold.checkpoints.folded, "load"), (layerfold.checkpoints.folded, "load_source"),
                         (layerfold.checkpoints.folded, "load_any"), (layerfold.jobs.evaluate, "load_any"),
                         (layerfold.jobs.info, "load")):  # fmt: skip
        monkeypatch.setattr(module, name, no_loading)
    m = world / "models"
    for args, message in (
        (["fold", m / "llama", "--out", world / "x", "--strategy", "cycle", "--unique", "2", "--rank", "999"], "rank 999"),
        (["fold", m / "llama", "--out", world / "x", "--strategy", "cycle", "--unique", "9"], "unique"),
        (_commands(world, world / "x")["heal"] + ["--hidden-layers", "7"], "--hidden-layers"),
        (_commands(world, world / "x")["heal"] + ["--loss", "cosine"], "cosine loss is for encoders"),
        (["eval", m / "bert", "--task", "ppl", "--data", world / "text.txt"], "needs a causal language model"),
        (["eval", m / "bert-folded", "--task", "sts", "--data", world / "text.txt"], "not an STS-B file"),
        (["eval", m / "llama-folded", "--task", "sts", "--data", world / "text.txt"], "needs an encoder"),
    ):
        code, _, err = run(capsys, *args)
        assert_one_line_error(code, err, message)
    assert not (world / "x").exists()
