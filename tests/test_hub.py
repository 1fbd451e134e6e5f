"""Folded checkpoints in transformers' Auto classes with no trust_remote_code (``layerfold.checkpoints.auto_classes``): every Auto
head, the usual from_pretrained arguments, Hub-style ids from an offline cache, and name_or_path."""

import shutil

import pytest
import torch
import transformers as T
from conftest import DECODERS, FAMILY_NAMES, build_tiny, outputs, sample_inputs

import layerfold
from layerfold import FoldPlan, LayerfoldError
from layerfold.checkpoints.auto_classes import AUTO_CLASSES

PLAN = dict(groups=[[0, 3]], drop=[1], num_layers=4, rank=2)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    models = {}
    for name in FAMILY_NAMES:
        model = layerfold.fold(build_tiny(name), FoldPlan.from_groups(**PLAN), progress=False)
        layerfold.save(model, root / name)
        models[name] = model
    return root, models


def base_outputs(model, inputs):
    with torch.no_grad():
        return model.base_model(**inputs).last_hidden_state


def heads_of(name):
    config_class = type(build_tiny(name).config)
    return [a for a in AUTO_CLASSES if hasattr(T, a) and config_class in getattr(T, a)._model_mapping]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_auto_head_of_the_base_architecture_loads_the_fold(folds, name):
    root, models = folds
    inputs = sample_inputs()
    reference = base_outputs(models[name], inputs)
    heads = heads_of(name)
    assert "AutoModel" in heads and len(heads) >= 2
    for auto_class in heads:
        model = getattr(T, auto_class).from_pretrained(root / name)
        expected_class = getattr(T, auto_class)._model_mapping[type(models[name].config)]
        assert type(model) is expected_class, auto_class
        assert model.config.name_or_path == str(root / name)
        assert not getattr(model, "is_quantized", False) and not hasattr(model, "hf_quantizer")
        assert torch.equal(base_outputs(model, inputs), reference), auto_class


def test_a_head_the_architecture_lacks_is_one_clear_error(folds):
    root, _ = folds
    with pytest.raises(LayerfoldError, match="has no AutoModelForMaskedLM model"):
        T.AutoModelForMaskedLM.from_pretrained(root / "llama")


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_from_pretrained_honours_dtype_device_map_attention_and_config_overrides(folds, name):
    root, models = folds
    auto = T.AutoModel if name == "bert" else T.AutoModelForCausalLM
    inputs = sample_inputs()
    reference = outputs(models[name], inputs)
    model = auto.from_pretrained(
        root / name, dtype=torch.bfloat16, device_map="cpu", attn_implementation="eager", output_hidden_states=True
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager" and model.config.output_hidden_states
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the only device here
    with torch.no_grad():
        result = model(**inputs)
    assert len(result.hidden_states) == 4  # embeddings + the three kept layers
    assert (outputs(model, inputs).float() - reference).abs().max().item() < 0.1  # bf16 rounding only
    if name != "bert":
        plain = auto.from_pretrained(root / name, use_cache=False, device_map="auto")
        assert plain.config.use_cache is False
        assert torch.equal(outputs(plain, inputs), reference)


def test_a_sequence_classifier_on_a_folded_decoder_keeps_the_fold_and_a_new_head(folds, tmp_path):
    root, models = folds
    model = T.AutoModelForSequenceClassification.from_pretrained(root / "llama", num_labels=3)
    assert model.config.num_labels == 3 and model.score.weight.shape[0] == 3
    assert torch.equal(base_outputs(model, sample_inputs()), base_outputs(models["llama"], sample_inputs()))
    model.save_pretrained(tmp_path / "classifier")  # a folded checkpoint of the classifier, reloaded bit for bit
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert type(again) is T.LlamaForSequenceClassification
    assert torch.equal(outputs(again, sample_inputs()), outputs(model, sample_inputs()))


def test_a_hub_style_id_loads_from_an_offline_cache(folds, tmp_path):
    root, models = folds
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-llama-folded" / "snapshots" / commit
    shutil.copytree(root / "llama", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    model = T.AutoModelForCausalLM.from_pretrained(
        "someone/tiny-llama-folded", cache_dir=str(cache), local_files_only=True
    )
    assert model.config.name_or_path == "someone/tiny-llama-folded"  # what a PEFT adapter records as its base
    assert torch.equal(outputs(model, sample_inputs()), outputs(models["llama"], sample_inputs()))


@pytest.mark.parametrize("name", DECODERS[:3])
def test_generate_with_the_kv_cache_matches_the_folded_model(folds, name):
    root, models = folds
    model = T.AutoModelForCausalLM.from_pretrained(root / name)
    prompt = sample_inputs(batch=1, length=6)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**prompt, **settings), models[name].generate(**prompt, **settings))


def test_a_format_1_checkpoint_loads_through_the_auto_class():
    from test_format import FIXTURE

    reference = layerfold.load(FIXTURE / "llama")
    model = T.AutoModelForCausalLM.from_pretrained(FIXTURE / "llama")
    assert type(model) is T.LlamaForCausalLM
    assert torch.equal(outputs(model, sample_inputs()), outputs(reference, sample_inputs()))
