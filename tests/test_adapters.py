"""PEFT LoRA on folds (layerfold.checkpoints.adapters): attaches to tied and factorised projections, trains (the shared
weights stay frozen), saves and reloads, and merges into a tie fold exactly, which saves and reloads as a fold."""

import pytest
import torch
import transformers as T
from conftest import build_tiny, outputs, sample_inputs

import layerfold
from layerfold import FoldPlan, LayerfoldError

peft = pytest.importorskip("peft")
from layerfold.checkpoints.adapters import lora_config, load_adapter  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
AUTO = {"llama": T.AutoModelForCausalLM, "gpt2": T.AutoModelForCausalLM, "bert": T.AutoModel}


def tie_fold(name, tmp_path, rank=2):
    model = layerfold.fold(build_tiny(name), FoldPlan.from_groups(groups=[[0, 3]], drop=[1], num_layers=4, rank=rank),
                           progress=False)  # fmt: skip
    layerfold.save(model, tmp_path / "folded")
    return AUTO[name].from_pretrained(tmp_path / "folded")


def factor_fold(tmp_path):
    operations = [{"op": "factor", "layers": [0, 1, 2, 3], "projection": p, "rank": 8, "whiten": False}
                  for p in ("self_attn.q_proj", "mlp.up_proj")]  # fmt: skip
    plan = FoldPlan.from_dict({"num_layers": 4, "operations": operations})
    layerfold.save(layerfold.fold(build_tiny("llama"), plan, progress=False), tmp_path / "factored")
    return T.AutoModelForCausalLM.from_pretrained(tmp_path / "factored")


def train_step(model, inputs):
    model.train()
    result = model(**inputs, labels=inputs["input_ids"]) if hasattr(model, "lm_head") or hasattr(
        getattr(model, "base_model", None), "lm_head") else None  # fmt: skip
    loss = result.loss if result is not None else model(**inputs).last_hidden_state.pow(2).mean()
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.5).step()
    model.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_a_lora_on_a_tie_fold_trains_saves_reloads_and_merges_into_the_fold(name, tmp_path):
    fold = tie_fold(name, tmp_path)
    shared_before = {n: p.detach().clone() for n, p in fold.named_parameters() if "layerfold_shared" in n}
    # PEFT's own config works too: layerfold registers its folded types with it (adapters.install_peft_dispatch),
    # and the shared weights in the store get no adapter.
    plain = peft.get_peft_model(tie_fold(name, tmp_path / "again"), peft.LoraConfig(r=4, target_modules=TARGETS[name]))
    assert sum(type(m).__name__ == "FoldedLoraLinear" for m in plain.modules()) == len(TARGETS[name]) * 2
    assert not any("lora_" in n for n, _ in plain.named_parameters() if "layerfold_shared" in n)
    model = peft.get_peft_model(fold, lora_config(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights=False))
    folded = [m for m in model.modules() if type(m).__name__ == "FoldedLoraLinear"]
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(folded) == len(TARGETS[name]) * 2  # the two tied layers' projections
    assert len(lora_layers) == len(TARGETS[name]) * 3  # and the untied kept layer's plain ones
    inputs = sample_inputs()
    train_step(model, inputs)
    for n, p in model.named_parameters():  # only the adapter trained; the shared weights are untouched
        assert p.requires_grad == ("lora_A.default" in n or "lora_B.default" in n), n
    for n, p in model.named_parameters():
        if "layerfold_shared" in n:
            assert torch.equal(p, shared_before[n.split("base_model.model.", 1)[-1]])
    adapted = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    assert peft.PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(tmp_path / "folded")
    reloaded = load_adapter(AUTO[name].from_pretrained(tmp_path / "folded"), str(tmp_path / "adapter"))
    assert torch.equal(outputs(reloaded, inputs), adapted)

    merged = reloaded.merge_and_unload()
    assert not any(type(m).__name__ == "FoldedLoraLinear" for m in merged.modules())
    torch.testing.assert_close(outputs(merged, inputs), adapted, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # still a fold: the tied layers' relaxations grew by 4
    plan = layerfold.load(tmp_path / "merged")
    again = AUTO[name].from_pretrained(tmp_path / "merged")
    assert torch.equal(outputs(again, inputs), outputs(merged, inputs))
    assert torch.equal(outputs(plan, inputs), outputs(merged, inputs))
    assert layerfold.unique_parameters(again) < layerfold.unique_parameters(build_tiny(name))


def test_unmerge_restores_the_fold(tmp_path):
    fold = tie_fold("llama", tmp_path, rank=0)
    inputs = sample_inputs()
    before = outputs(fold, inputs)
    model = peft.get_peft_model(fold, lora_config(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted = outputs(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    tied = [m.get_base_layer() for m in model.modules() if type(m).__name__ == "FoldedLoraLinear"]
    assert [m.rank for m in tied] == [2, 2]  # the merged adapter is each tied layer's relaxation now
    model.unmerge_adapter()
    assert [m.rank for m in tied] == [0, 0] and all(m.lora_A is None for m in tied)
    with model.disable_adapter():  # exact on the tied layers; PEFT's own subtraction on the plain one
        torch.testing.assert_close(outputs(model, inputs), before, rtol=1e-5, atol=1e-6)


def test_a_lora_on_a_factorised_fold_trains_and_reloads_but_does_not_merge(tmp_path):
    fold = factor_fold(tmp_path)
    inputs = sample_inputs()
    model = peft.get_peft_model(fold, lora_config(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
    assert any(type(m).__name__ == "FoldedLoraLinear" for m in model.modules())
    train_step(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(T.AutoModelForCausalLM.from_pretrained(tmp_path / "factored"), str(tmp_path / "adapter"))
    assert torch.equal(outputs(reloaded, inputs), outputs(model, inputs))
    with pytest.raises(LayerfoldError, match="cannot take a merged low-rank update"):
        reloaded.merge_and_unload()
