"""Every route by which another tool loads a folded folder either loads the fold exactly or refuses it with one
error: the Auto classes, the concrete classes (``LlamaForCausalLM.from_pretrained``), PEFT's ``AutoPeftModel…``
and ``PeftModel.from_pretrained``, lm-eval's ``HFLM``, ``pipeline(model=folder)`` and ``SentenceTransformer`` —
each in a fresh process that imported layerfold and in one that did not (then: refused, never random weights).
Also: a caller's ``quantization_config``, and folds laid out as the Hugging Face cache lays them out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import save_tiny_with_tokenizer, sample_inputs
from safetensors.torch import load_file

import layerfold
from layerfold import FoldPlan, LayerfoldError
from layerfold.operations import PruneChannels

peft = pytest.importorskip("peft")
from layerfold.checkpoints.adapters import load_adapter, lora_config  # noqa: E402

PLAN = dict(groups=[[0, 3]], drop=[1], num_layers=4, rank=2)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

# Each route loads a model the way that tool does and returns the tensor compared with layerfold's own load.
_ROUTES = r'''
import json, sys, traceback
from pathlib import Path
root, out, with_layerfold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if with_layerfold:
    import layerfold  # noqa: F401
import torch
import transformers as T
from safetensors.torch import save_file
inputs = {k: torch.tensor(v) for k, v in json.loads((root / "inputs.json").read_text()).items()}
llama, bert, adapter = root / "llama-folded", root / "bert-folded", root / "adapter"

def logits(model):
    with torch.no_grad():
        return model(**inputs).logits

def hidden(model):
    with torch.no_grad():
        return model(**inputs).last_hidden_state

def hflm():
    from lm_eval.models.huggingface import HFLM
    return logits(HFLM(pretrained=str(llama), device="cpu", batch_size=1).model)

def peft_model():
    from peft import PeftModel
    return logits(PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(llama), str(adapter)))

def auto_peft():
    from peft import AutoPeftModelForCausalLM
    return logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter)))

def sentence_transformers():
    from sentence_transformers import SentenceTransformer
    return hidden(SentenceTransformer(str(bert), device="cpu")[0].auto_model)

ROUTES = {
    "auto-class": lambda: logits(T.AutoModelForCausalLM.from_pretrained(llama)),
    "auto-model": lambda: hidden(T.AutoModel.from_pretrained(bert)),
    "concrete-llama": lambda: logits(T.LlamaForCausalLM.from_pretrained(llama)),
    "concrete-bert": lambda: hidden(T.BertModel.from_pretrained(bert)),
    "concrete-llama-pruned": lambda: logits(T.LlamaForCausalLM.from_pretrained(root / "llama-pruned")),
    "auto-peft": auto_peft,
    "peft-model": peft_model,
    "lm-eval-hflm": hflm,
    "pipeline": lambda: logits(T.pipeline("text-generation", model=str(llama), device="cpu").model),
    "sentence-transformers": sentence_transformers,
}
results = {}
for name, route in ROUTES.items():
    try:
        save_file({"out": route().contiguous()}, str(out / f"{name}.safetensors"))
        results[name] = {"loaded": True}
    except Exception as err:  # what the route says when it refuses
        results[name] = {"loaded": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
(out / "results.json").write_text(json.dumps(results))
'''
ROUTES = ("auto-class", "auto-model", "concrete-llama", "concrete-bert", "concrete-llama-pruned", "auto-peft", "peft-model", "lm-eval-hflm",
          "pipeline", "sentence-transformers")  # fmt: skip


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """A tie fold of a tiny llama (with a LoRA adapter trained on it by PEFT) and of a tiny BERT saved as a
    sentence-transformers folder, both with a real tokenizer; the outputs layerfold's own load gives."""
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("routes"))
    (root / "bert" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))  # fmt: skip
    (root / "bert" / "1_Pooling").mkdir()
    (root / "bert" / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                         "pooling_mode_mean_tokens": True}))
    for name in ("llama", "bert"):
        model = layerfold.load_source(root / name)
        layerfold.save(layerfold.fold(model, FoldPlan.from_groups(**PLAN), progress=False), root / f"{name}-folded",
                       source=root / name)  # fmt: skip
    # A width fold: narrower MLPs in two layers (a size mismatch for the plain class).
    pruned = FoldPlan(4, [PruneChannels(layers=[0, 1], keep=[list(range(0, 128, 2)), list(range(64))],
                                       compensate=False)])
    layerfold.save(layerfold.fold(layerfold.load_source(root / "llama"), pruned, progress=False), root / "llama-pruned")
    inputs = sample_inputs()
    (root / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    adapted = peft.get_peft_model(
        T.AutoModelForCausalLM.from_pretrained(root / "llama-folded"),
        lora_config(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapted.save_pretrained(root / "adapter")
    with torch.no_grad():
        llama = layerfold.load(root / "llama-folded")
        expected = {
            "llama": llama(**inputs).logits,
            "bert": layerfold.load(root / "bert-folded")(**inputs).last_hidden_state,
            "pruned": layerfold.load(root / "llama-pruned")(**inputs).logits,
            "adapter": load_adapter(T.AutoModelForCausalLM.from_pretrained(root / "llama-folded"),
                                    str(root / "adapter"))(**inputs).logits,  # fmt: skip
        }
    assert not torch.equal(expected["adapter"], expected["llama"])  # the adapter changes the outputs
    return root, expected


@pytest.fixture(scope="module", params=["with layerfold", "without layerfold"])
def routes(request, folds, tmp_path_factory):
    """Every route, run in one fresh process that imported layerfold (or did not)."""
    root, _ = folds
    out = tmp_path_factory.mktemp("loaded")
    with_layerfold = request.param == "with layerfold"
    result = subprocess.run([sys.executable, "-c", _ROUTES, root, out, "1" if with_layerfold else "0"], env=ENV,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return with_layerfold, out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("route", ROUTES)
def test_every_loading_route_loads_the_fold_exactly_or_refuses_it(folds, routes, route):
    _, expected = folds
    with_layerfold, out, results = routes
    result = results[route]
    if with_layerfold:
        assert result["loaded"], result.get("trace")
        reference = {"auto-model": "bert", "concrete-bert": "bert", "sentence-transformers": "bert",
                     "auto-peft": "adapter", "peft-model": "adapter", "concrete-llama-pruned": "pruned"}.get(route, "llama")  # fmt: skip
        assert torch.equal(load_file(out / f"{route}.safetensors")["out"], expected[reference])
    else:  # refused, never with random weights: a concrete class by the guard (naming layerfold), an Auto class
        # because the folder's model type is transformers' only with layerfold's code (trust_remote_code=True)
        assert not result["loaded"], result
        assert "import layerfold" in result["error"] or "trust_remote_code=True" in result["error"], result


def test_a_class_of_another_architecture_is_refused_in_one_line(folds):
    root, _ = folds
    with pytest.raises(LayerfoldError, match="this fold is a LlamaForCausalLM .llama.; BertModel cannot load it"):
        T.BertModel.from_pretrained(root / "llama-folded")


def test_a_callers_quantization_config_none_is_nothing_and_any_other_is_refused(folds):
    root, expected = folds
    model = T.AutoModelForCausalLM.from_pretrained(root / "llama-folded", quantization_config=None)  # as HFLM passes
    with torch.no_grad():
        assert torch.equal(model(**sample_inputs()).logits, expected["llama"])
    with pytest.raises(LayerfoldError, match=r"quantization_config \(QuantoConfig\) is not supported on a fold"):
        T.AutoModelForCausalLM.from_pretrained(root / "llama-folded", quantization_config=T.QuantoConfig())


def _hub_cache(folder, cache, repo="someone/folded"):
    """``folder`` laid out as huggingface_hub lays out a download: files named by their hash in blobs/, each
    snapshot file a relative link to its blob."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        if file.is_file():
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copy(file, repo_dir / "blobs" / digest)
            os.symlink(f"../../blobs/{digest}", snapshot / file.name)
    return snapshot


def test_a_sharded_fold_in_a_hub_cache_loads_and_a_link_out_of_the_cache_is_refused(folds, tmp_path):
    root, expected = folds
    layerfold.save(layerfold.load(root / "llama-folded"), tmp_path / "sharded", max_shard_bytes=2_000_000)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    cache = tmp_path / "cache"
    snapshot = _hub_cache(tmp_path / "sharded", cache)
    by_id = T.AutoModelForCausalLM.from_pretrained("someone/folded", cache_dir=str(cache), local_files_only=True)
    concrete = T.LlamaForCausalLM.from_pretrained("someone/folded", cache_dir=str(cache), local_files_only=True)
    with torch.no_grad():
        for model in (by_id, concrete, layerfold.load(snapshot)):
            assert torch.equal(model(**sample_inputs()).logits, expected["llama"])
    # One shard now links to a copy outside the cache: refused by every route, before anything is read.
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard.resolve(), outside)
    shard.unlink()
    os.symlink(outside, shard)
    for load in (lambda: layerfold.load(snapshot),
                 lambda: T.AutoModelForCausalLM.from_pretrained("someone/folded", cache_dir=str(cache),
                                                                local_files_only=True)):  # fmt: skip
        with pytest.raises(LayerfoldError, match="outside the checkpoint folder"):
            load()


_CRAFTED_ADAPTERS = r"""
import json, resource, sys
limit = 6 * 1024**3  # address space: torch and transformers need about 2-3 GB of it; r = 10**9 would take 256 GB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import peft, transformers as T
import layerfold
from layerfold.checkpoints.adapters import load_adapter
fold, adapter = sys.argv[1], sys.argv[2]
config = json.loads(open(adapter + "/adapter_config.json").read())
said = []
for loader, bad in [("layerfold", {"r": 10**9}), ("layerfold", {"rank_pattern": {"q_proj": 10**9}}),
                    ("layerfold", {"r": 0}), ("peft", {"r": 10**9})]:
    open(adapter + "/adapter_config.json", "w").write(json.dumps({**config, **bad}))
    model = T.AutoModelForCausalLM.from_pretrained(fold)
    try:
        load_adapter(model, adapter) if loader == "layerfold" else peft.PeftModel.from_pretrained(model, adapter)
        said.append("loaded")
    except layerfold.LayerfoldError as err:
        said.append(str(err))
print(json.dumps(said))
"""


def test_an_adapter_too_large_for_the_model_is_refused_before_peft_allocates(folds, tmp_path):
    """Crafted ranks in adapter_config.json, under an address-space limit: layerfold's load_adapter checks them
    against the model; PEFT's own loader is stopped at the first folded projection."""
    root, _ = folds
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    result = subprocess.run([sys.executable, "-c", _CRAFTED_ADAPTERS, root / "llama-folded", tmp_path / "adapter"],
                            env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    said = json.loads(result.stdout.strip().splitlines()[-1])
    assert all("allow a rank of 1 to" in line for line in said[:3]), said
    assert "rank 1000000000 on a" in said[3], said


def test_old_folds_without_the_guard_still_load(folds, tmp_path):
    """A fold written before the guard (config.json without it) loads through layerfold and the Auto classes."""
    root, expected = folds
    shutil.copytree(root / "llama-folded", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for part in (config, config["base_config"]):
        part.pop("transformers_weights")
        part.pop("quantization_config")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        for model in (layerfold.load(tmp_path / "old"), T.AutoModelForCausalLM.from_pretrained(tmp_path / "old")):
            assert torch.equal(model(**sample_inputs()).logits, expected["llama"])
