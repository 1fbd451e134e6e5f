import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from conftest import ENCODERS, FAMILY_NAMES, TINY, build_tiny, outputs, sample_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import layerfold
from layerfold import FoldPlan, LayerfoldError
from layerfold.checkpoints.output_guard import atomic_output_dir

# Ties layers 0 and 3, drops layer 1, relaxes at rank 2: every part of the format is exercised.
PLAN = dict(groups=[[0, 3]], drop=[1], num_layers=4, rank=2)
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from safetensors.torch import load_file, save_file
    import layerfold

    root = sys.argv[1]
    jobs = json.loads(open(f"{root}/jobs.json").read())
    inputs = load_file(f"{root}/inputs.safetensors")
    results = {}
    for name, auto_class in jobs.items():
        for how, model in (
            ("layerfold", layerfold.load(f"{root}/{name}")),
            ("auto", getattr(transformers, auto_class).from_pretrained(f"{root}/{name}", trust_remote_code=True)),
            ("plain-auto", getattr(transformers, auto_class).from_pretrained(f"{root}/{name}")),
        ):
            with torch.no_grad():
                out = model(**inputs)
            value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            results[f"{name}/{how}"] = value.contiguous()
    save_file(results, f"{root}/results.safetensors")
    """
)


@pytest.fixture(scope="session")
def saved_families(tmp_path_factory):
    """Every tiny family folded, saved, then loaded in one fresh Python process two ways."""
    root = tmp_path_factory.mktemp("saved")
    inputs = sample_inputs()
    save_file(inputs, root / "inputs.safetensors")
    expected, folded_models, jobs = {}, {}, {}
    for name in FAMILY_NAMES:
        model = layerfold.fold(build_tiny(name), FoldPlan.from_groups(**PLAN), progress=False)
        layerfold.save(model, root / name)
        expected[name] = outputs(model, inputs)
        folded_models[name] = model
        jobs[name] = "AutoModelForCausalLM" if name not in ENCODERS else "AutoModel"
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"))
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(root)], check=True, env=env)
    return root, expected, folded_models, load_file(root / "results.safetensors")


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("how", ["layerfold", "auto", "plain-auto"])
def test_save_then_load_in_a_fresh_process_is_bit_identical(saved_families, name, how):
    _, expected, _, results = saved_families
    assert torch.equal(results[f"{name}/{how}"], expected[name])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_checkpoint_size_matches_unique_parameters(saved_families, name):
    root, _, models, _ = saved_families
    model = models[name]
    buffers = sum(b.numel() for n, b in model.named_buffers() if n in model.state_dict())
    expected_bytes = (layerfold.unique_parameters(model) + buffers) * 4
    actual = (root / name / "model.safetensors").stat().st_size
    assert abs(actual - expected_bytes) / expected_bytes < 0.02


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_tensor_is_stored_once(saved_families, name):
    root, _, models, _ = saved_families
    with safe_open(root / name / "model.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
        aliases = json.loads(handle.metadata()["layerfold_aliases"])
    assert not stored & set(aliases)
    # Layer 0 and layer 3 share one stored weight per projection, under the fold state.
    assert any(".layerfold_shared.tie_0." in key or key.startswith("layerfold_shared.tie_0.") for key in stored)


def test_loaded_model_keeps_tied_embeddings_tied(saved_families):
    root, _, models, _ = saved_families
    model = layerfold.load(root / "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert layerfold.unique_parameters(model) == layerfold.unique_parameters(models["gpt2"])
    assert layerfold.parameter_breakdown(model) == layerfold.parameter_breakdown(models["gpt2"])


def test_loading_never_unpickles(saved_families, monkeypatch):
    root, expected, _, _ = saved_families

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    assert torch.equal(outputs(layerfold.load(root / "llama"), sample_inputs()), expected["llama"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "gemma2", "opt"])
def test_export_writes_a_plain_checkpoint_with_the_same_outputs(saved_families, tmp_path, name):
    root, expected, _, _ = saved_families
    layerfold.export(root / name, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == name and "auto_map" not in config
    _, model_class = TINY[name]
    plain = model_class.from_pretrained(tmp_path / "plain")
    assert plain.config.num_hidden_layers == 3
    assert (outputs(plain, sample_inputs()) - expected[name]).abs().max().item() <= 1e-5


def test_without_layerfold_imported_transformers_refuses_rather_than_loading_random_weights(saved_families):
    root, _, _, _ = saved_families
    script = (
        "import sys, transformers\n"
        "try:\n"
        "    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
        "except ValueError as err:\n"
        "    print('refused:', str(err).splitlines()[0])\n"
        "assert 'layerfold' not in sys.modules\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script, str(root / "llama")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:")


def test_saving_needs_a_folded_model(tmp_path):
    with pytest.raises(LayerfoldError, match="not folded"):
        layerfold.save(build_tiny("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model = layerfold.fold(build_tiny("llama"), FoldPlan.cycle(4, 2), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(LayerfoldError, match="already exists"):
        layerfold.save(model, out)
    # --overwrite replaces only what layerfold wrote: a folder of someone else's files is refused by name.
    with pytest.raises(LayerfoldError, match="holds files layerfold did not write .'precious.txt'"):
        layerfold.save(model, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "mine"
    (out / "precious.txt").unlink()
    layerfold.save(model, out, overwrite=True)  # an empty folder
    layerfold.save(model, out, overwrite=True)  # its own output
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = layerfold.fold(build_tiny("llama"), FoldPlan.cycle(4, 2), progress=False)
    with pytest.raises(LayerfoldError, match="cannot write output directory"):
        layerfold.save(model, blocker / "out")


def test_loading_something_else_is_one_clear_error(tmp_path):
    with pytest.raises(LayerfoldError, match="folded model not found"):
        layerfold.load(tmp_path / "missing")
    build_tiny("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(LayerfoldError, match="not a layerfold checkpoint"):
        layerfold.load(tmp_path / "plain")


def test_load_source_checks_the_architecture_before_loading(tmp_path):
    with pytest.raises(LayerfoldError, match="model path not found"):
        layerfold.load_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerfoldError, match="no config.json"):
        layerfold.load_source(tmp_path / "empty")
    T.T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    with pytest.raises(LayerfoldError, match="unsupported architecture: model type 't5'"):
        layerfold.load_source(tmp_path / "t5")


# ---- sentence-transformers' files travel with the model -----------------------------------------------------
def test_fold_and_export_carry_the_sentence_transformers_files(tmp_path):
    """A sentence-transformers folder (pooling, normalisation, max length) folded and exported: SentenceTransformer
    on either gives the folded encoder's mean-pooled, normalised embeddings, as the original's wrapper would."""
    import torch.nn.functional as F
    from conftest import save_tiny_with_tokenizer
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    import layerfold
    from layerfold.jobs.fold import fold_with_method
    from layerfold.evaluation.metrics import mean_pool

    save_tiny_with_tokenizer(tmp_path, names=("bert",))
    module = Transformer(str(tmp_path / "bert"), max_seq_length=24)
    original = SentenceTransformer(modules=[module, Pooling(64, "mean"), Normalize()])
    original.save(str(tmp_path / "st"))
    shutil.rmtree(tmp_path / "st" / "2_Normalize")  # as in many copies of real models: named, but no folder
    fold_with_method(tmp_path / "st", tmp_path / "folded", keep_blocks=0.5, method="tie-cycle", progress=False)
    layerfold.export(tmp_path / "folded", tmp_path / "plain")
    for folder in ("folded", "plain"):
        assert json.loads((tmp_path / folder / "modules.json").read_text()) == json.loads(
            (tmp_path / "st" / "modules.json").read_text()
        )
        assert (tmp_path / folder / "1_Pooling" / "config.json").is_file() and (tmp_path / folder / "2_Normalize").is_dir()

    sentences = ["a folded encoder", "keeps its pooling and its normalisation " * 6]
    folded = layerfold.load(tmp_path / "folded")
    tokenizer = layerfold.load_tokenizer(tmp_path / "folded")
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(mean_pool(folded(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    plain = SentenceTransformer(str(tmp_path / "plain"), local_files_only=True)  # no layerfold code needed
    remote = SentenceTransformer(str(tmp_path / "folded"), trust_remote_code=True, local_files_only=True)
    registered = SentenceTransformer(str(tmp_path / "folded"), local_files_only=True)  # import layerfold is enough
    for encoder in (plain, remote, registered):
        assert encoder.max_seq_length == 24
        embeddings = encoder.encode(sentences, convert_to_tensor=True)
        torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))


def test_a_module_list_that_leaves_the_folder_is_not_copied(tmp_path, capsys):
    from layerfold.checkpoints.originals import copy_side_files

    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "model" / "modules.json").write_text(json.dumps([{"idx": 1, "path": "../../outside"}]))
    copy_side_files(tmp_path / "model", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert "not a sentence-transformers module list inside the folder" in capsys.readouterr().err


# ---- exports of drop-only plans: the base architecture, read without layerfold ------------------------------
_READ_WITHOUT_LAYERFOLD = """
import sys
sys.modules["layerfold"] = None  # any import of layerfold fails
import transformers
from safetensors.torch import load_file, save_file
inputs = load_file(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
save_file({"logits": model(**inputs).logits.detach().contiguous()}, sys.argv[3])
print(model.config.num_hidden_layers, getattr(model.config, "layer_types", None))
"""


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_drop_only_export_is_the_base_architecture_with_fewer_layers(tmp_path, name):
    from safetensors.torch import load_file, save_file

    from layerfold.jobs.export import export_model_dir
    from layerfold.jobs.fold import fold_model_dir

    model = build_tiny(name)
    if name == "qwen2":  # layers 2 and 3 use a sliding window of 4 tokens: the export must keep which do
        settings = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}  # derived anew
        model = TINY[name][1](T.Qwen2Config(**{**settings, "use_sliding_window": True, "sliding_window": 4,
                                                "max_window_layers": 2})).eval()  # fmt: skip
    model.save_pretrained(tmp_path / "original")
    plan = FoldPlan.from_groups([], drop=[1], num_layers=4)  # keeps 0 (full attention), 2 and 3 (sliding)
    fold_model_dir(tmp_path / "original", tmp_path / "folded", plan_for=plan, progress=False)
    report = export_model_dir(tmp_path / "folded", tmp_path / "plain")
    assert report.same_architecture and (report.layers, report.original_layers) == (3, 4)
    assert report.dtype == "float32" and "as the original was, with 3 of its 4 layers" in report.markdown()
    half = export_model_dir(tmp_path / "folded", tmp_path / "bf16", dtype="bf16")
    assert half.dtype == "bfloat16" and half.bytes_on_disk < 0.55 * report.bytes_on_disk
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "auto_map" not in config
    if name == "qwen2":
        assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
        assert config["max_window_layers"] == 1  # derives the same layer_types again

    inputs = {k: v.contiguous() for k, v in sample_inputs().items()}
    save_file(inputs, tmp_path / "inputs.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_LAYERFOLD, str(tmp_path / "plain"), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "logits.safetensors")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = layerfold.load(tmp_path / "folded")(**inputs).logits
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected, rtol=1e-5, atol=1e-5)
    assert result.stdout.split()[0] == "3"


def test_export_of_a_tie_says_it_stores_every_layer_and_checks_the_dtype(saved_families, tmp_path, capsys):
    from layerfold.cli.commands import main

    root, _, _, _ = saved_families
    assert main(["export", str(root / "llama"), "--out", str(tmp_path / "x"), "--dtype", "fp8"]) == 2
    assert "'--dtype': Value error, 'fp8' is not one of 'fp32', 'fp16', 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(root / "llama"), "--out", str(tmp_path / "plain"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["same_architecture"] is False and report["dtype"] == "float32" and report["layers"] == 3
    assert main(["export", str(root / "llama"), "--out", str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    assert "merged back into per-layer weights" in capsys.readouterr().out
    half, full = (tmp_path / "half" / "model.safetensors").stat().st_size, report["bytes_on_disk"]
    assert half < 0.55 * full
