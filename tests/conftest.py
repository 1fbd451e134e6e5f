"""Tiny random models, one per supported family, built locally from config classes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)

_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=128)
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config factory, model class)
TINY = {
    "llama": (lambda: T.LlamaConfig(**_DECODER, num_key_value_heads=2, **_SPECIAL), T.LlamaForCausalLM),
    "mistral": (lambda: T.MistralConfig(**_DECODER, num_key_value_heads=2, **_SPECIAL), T.MistralForCausalLM),
    "qwen2": (lambda: T.Qwen2Config(**_DECODER, num_key_value_heads=2, **_SPECIAL), T.Qwen2ForCausalLM),
    "qwen3": (lambda: T.Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=16, **_SPECIAL), T.Qwen3ForCausalLM),
    "gemma": (lambda: T.GemmaConfig(**_DECODER, num_key_value_heads=2, head_dim=16, **_SPECIAL), T.GemmaForCausalLM),
    "gemma2": (
        lambda: T.Gemma2Config(**_DECODER, num_key_value_heads=2, head_dim=16, sliding_window=6, **_SPECIAL),
        T.Gemma2ForCausalLM,
    ),
    "gemma3_text": (
        lambda: T.Gemma3TextConfig(
            **_DECODER,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
            **_SPECIAL,
        ),
        T.Gemma3ForCausalLM,
    ),
    "phi3": (lambda: T.Phi3Config(**_DECODER, num_key_value_heads=2, **_SPECIAL), T.Phi3ForCausalLM),
    "gpt2": (
        lambda: T.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64, **_SPECIAL),
        T.GPT2LMHeadModel,
    ),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**_DECODER, **_SPECIAL), T.GPTNeoXForCausalLM),
    "opt": (
        lambda: T.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=64,
            **_SPECIAL,
        ),
        T.OPTForCausalLM,
    ),
    "bert": (
        lambda: T.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=128
        ),
        T.BertModel,
    ),
    "roberta": (
        lambda: T.RobertaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=128,
            pad_token_id=1,
        ),
        T.RobertaModel,
    ),
    "mpnet": (
        lambda: T.MPNetConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=128
        ),
        T.MPNetModel,
    ),
}
FAMILY_NAMES = sorted(TINY)
ENCODERS = ("bert", "mpnet", "roberta")
DECODERS = [name for name in FAMILY_NAMES if name not in ENCODERS]


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model whose weights are large enough that layers really differ."""
    config_factory, model_class = TINY[family]
    torch.manual_seed(seed)
    model = model_class(config_factory()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.08)
    return model


def sample_inputs(seed: int = 1, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 128, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") and result.logits is not None else result.last_hidden_state


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=DECODERS)
def decoder_family(request) -> str:
    return request.param


def save_tiny_with_tokenizer(root, names=("llama", "bert")):
    """Save tiny models with a real tokenizer (all-MiniLM-L6-v2's 30k WordPiece) under ``root/<family>``."""
    from transformers import AutoTokenizer

    from layerfold.jobs.demo import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    for name in names:
        model = build_tiny(name)
        model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


# ---- comparing a streamed fold with the in-memory fold ---------------------------------------------------------
def assert_same_checkpoint(streamed, in_memory) -> None:
    """Two folded checkpoints hold the same tensors bit for bit, the same aliases and the same plan."""
    from layerfold.checkpoints.reading import _aliases, read_weights

    a, b = read_weights(streamed), read_weights(in_memory)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert _aliases(streamed) == _aliases(in_memory)
    assert (
        json.loads((streamed / "config.json").read_text())["fold_plan"]
        == json.loads((in_memory / "config.json").read_text())["fold_plan"]
    )


def in_memory_fold(source, plan, out, statistics_batches=None):
    """Fold the original at ``source`` in memory with ``plan`` and save it to ``out``."""
    from layerfold.engine.calibrate import Calibration
    from layerfold.folding.in_memory import fold
    from layerfold.checkpoints.folded import load_source, save
    from layerfold.operations.plan import FoldPlan

    model = load_source(source)
    statistics = None
    if statistics_batches is not None:
        statistics = Calibration(model, statistics_batches(model)).statistics(progress=False)
    # The streamed path fits to the original's inputs: compared with it, the in-memory fold is not sequential.
    fold(model, FoldPlan.from_dict(plan.to_dict()), calibration=statistics, progress=False, sequential=False)
    save(model, out, source=source)
    return out


def assert_saves_loads_and_exports(model, directory) -> None:
    """Saved and loaded: the same outputs, bit for bit; exported: the same outputs as a plain model."""
    import layerfold

    inputs = sample_inputs()
    layerfold.save(model, directory / "folded")
    loaded = layerfold.load(directory / "folded")
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    layerfold.export(directory / "folded", directory / "plain")
    plain = layerfold.load_source(directory / "plain")
    torch.testing.assert_close(outputs(plain, inputs), outputs(model, inputs), rtol=1e-4, atol=1e-4)
