"""On the real all-MiniLM-L6-v2 (the embedded default model), all-mpnet-base-v2 and gemma-3-270m weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import layerfold
from layerfold import FoldPlan
from layerfold.cli.commands import main
from layerfold.jobs.demo import default_model_path, pydoc_paragraphs
from layerfold.evaluation.metrics import embedding_fidelity, sentence_embeddings
from layerfold.core.store import fold_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    path = default_model_path()
    return path, AutoTokenizer.from_pretrained(path), layerfold.load_source(path), pydoc_paragraphs(limit=48)


def full_rank_fold(real_model, folded_dir, unique: int):
    """Fold a real encoder with tie-cycle at full rank by the CLI; the fold, checked to embed as the original."""
    path, tokenizer, original, texts = real_model
    args = ["fold", str(path), "--out", str(folded_dir), "--strategy", "cycle", "--unique", str(unique), "--rank", "full"]
    assert main(args) == 0
    reference = sentence_embeddings(original, tokenizer, texts)
    folded = layerfold.load(folded_dir)
    assert embedding_fidelity(reference, sentence_embeddings(folded, tokenizer, texts))["min"] > 0.99999
    return folded


def test_full_rank_fold_of_minilm_keeps_its_embeddings(minilm, tmp_path):
    path, tokenizer, original, texts = minilm
    folded_dir = tmp_path / "folded"
    folded = full_rank_fold(minilm, folded_dir, unique=3)
    # The checkpoint carries its tokenizer and loads through transformers' Auto classes.
    auto = AutoModel.from_pretrained(folded_dir, trust_remote_code=True)
    auto_tokenizer = AutoTokenizer.from_pretrained(folded_dir, trust_remote_code=True)
    assert torch.equal(sentence_embeddings(auto, auto_tokenizer, texts), sentence_embeddings(folded, tokenizer, texts))


def test_low_rank_fold_of_minilm_is_smaller_on_disk_and_in_parameters(minilm, tmp_path):
    path, tokenizer, original, texts = minilm
    report = layerfold.jobs.fold.fold_model_dir(path, tmp_path / "f", plan_for=FoldPlan.cycle(6, 3, rank=8), progress=False)
    before, after = report["before"], report["after"]
    assert after["parameters"]["embeddings"] == before["parameters"]["embeddings"]
    blocks_kept = after["parameters"]["blocks"] / before["parameters"]["blocks"]
    assert 0.5 < blocks_kept < 0.56  # three of six blocks plus rank-8 relaxations and per-layer norms/biases
    assert abs(after["bytes_on_disk"] / (after["parameters"]["total"] * 4) - 1) < 0.02
    cosine = embedding_fidelity(
        sentence_embeddings(original, tokenizer, texts),
        sentence_embeddings(layerfold.load(tmp_path / "f"), tokenizer, texts),
    )["mean"]
    assert 0.0 < cosine < 0.99  # folding without healing loses quality, as measured, not assumed


def test_demo_command_prints_its_table():
    # The quick demo (a quarter of the calibration and gate steps) and one heal step: CI runs the README's full
    # `make demo` (30 steps) right after the tests.
    result = subprocess.run(
        [sys.executable, "-m", "layerfold", "demo", "--quick", "--heal-steps", "1", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["keep_blocks"] <= 0.5 and report["heal"]["steps"] == 1
    assert report["after"]["parameters"]["total"] < report["before"]["parameters"]["total"]
    assert report["search"]["best"]["name"] == report["search"]["candidates"][0]["name"]
    assert 0 < report["held_out_cosine"]["mean"] < 1


# ---- sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers; installed by make install-dev) ------------------
@pytest.fixture(scope="module")
def mpnet():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import mpnet_dir

    path = mpnet_dir()
    return path, AutoTokenizer.from_pretrained(path), layerfold.load_source(path), pydoc_paragraphs(limit=24)


def test_full_rank_fold_of_mpnet_is_exact_and_loads_with_the_standard_tools(mpnet, tmp_path):
    from sentence_transformers import SentenceTransformer

    path, tokenizer, original, texts = mpnet
    assert original.config.model_type == "mpnet" and original.config.num_hidden_layers == 12
    folded_dir = tmp_path / "folded"
    folded = full_rank_fold(mpnet, folded_dir, unique=11)  # layers 0 and 11 tie: exact, and cheap
    auto = AutoModel.from_pretrained(folded_dir)  # import layerfold is enough: no trust_remote_code
    assert type(auto).__name__ == "MPNetModel"
    assert torch.equal(sentence_embeddings(auto, tokenizer, texts), sentence_embeddings(folded, tokenizer, texts))
    encoder = SentenceTransformer(str(folded_dir), local_files_only=True)
    plain = SentenceTransformer(str(path), local_files_only=True)
    assert encoder.max_seq_length == plain.max_seq_length == 384
    embeddings = encoder.encode(texts[:8], convert_to_tensor=True)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(8), atol=1e-5)  # 2_Normalize carried over
    assert torch.nn.functional.cosine_similarity(embeddings, plain.encode(texts[:8], convert_to_tensor=True)).min() > 0.9999


# ---- google/gemma-3-270m (gemma3_text, 18 layers, sliding-window attention; installed by make install-dev) ------
@pytest.fixture(scope="module")
def gemma3():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import gemma3_dir

    path = gemma3_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(" ".join(pydoc_paragraphs(limit=8)), return_tensors="pt").input_ids[:, :192]
    return path, tokenizer, layerfold.load_source(path), ids


def causal_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_fold_of_gemma3_matches_the_original_and_loads_with_the_standard_tools(gemma3, tmp_path):
    from transformers import AutoModelForCausalLM

    path, tokenizer, original, ids = gemma3
    config = original.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18 and config.vocab_size == 262144
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert ids.shape[1] == 192
    folded_dir = tmp_path / "folded"
    assert main(["fold", str(path), "--out", str(folded_dir), "--strategy", "cycle", "--unique", "16", "--rank", "full"]) == 0
    reference = causal_logits(original, ids)
    auto = AutoModelForCausalLM.from_pretrained(folded_dir)  # import layerfold is enough: no trust_remote_code
    assert type(auto).__name__ == "Gemma3ForCausalLM" and auto.name_or_path == str(folded_dir)
    logits = causal_logits(auto, ids)
    # Full rank reproduces every layer's weights to float rounding: the logits agree closely, the argmax exactly.
    assert (logits - reference).abs().max() < 1e-2 * reference.abs().max()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    # The standard save path writes the fold back: it reloads bit for bit, and generates as before.
    auto.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(causal_logits(again, ids), logits)
    prompt = ids[:, :16]
    assert torch.equal(
        again.generate(prompt, max_new_tokens=8, do_sample=False),
        original.generate(prompt, max_new_tokens=8, do_sample=False),
    )


def test_drop_fold_of_gemma3_exports_as_a_smaller_gemma3_with_its_layer_types(gemma3, tmp_path):
    path, tokenizer, original, ids = gemma3
    folded_dir, export_dir = tmp_path / "folded", tmp_path / "export"
    assert main(["fold", str(path), "--out", str(folded_dir), "--method", "drop-even", "--keep-blocks", "0.5"]) == 0
    assert main(["export", str(folded_dir), "--out", str(export_dir), "--dtype", "bf16"]) == 0
    saved = json.loads((export_dir / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and saved["num_hidden_layers"] == 9
    kept = fold_state(layerfold.load(folded_dir)).plan.kept_layers()
    assert len(kept) == 9 and saved["layer_types"] == [original.config.layer_types[i] for i in kept]
    # Loadable by transformers alone (a fresh process that never imports layerfold), in bf16.
    code = (
        "import sys; sys.modules['layerfold'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(export_dir)!r})\n"
        "assert type(m).__name__ == 'Gemma3ForCausalLM' and m.dtype == torch.bfloat16\n"
        "assert len(m.model.layers) == 9\n"
        "print(m(torch.tensor([[2, 651, 6037]])).logits.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "262144" in done.stdout
