import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, save_tiny_with_tokenizer

import layerfold
from layerfold import LayerfoldError
from layerfold.cli.commands import main
from layerfold.core.texts import read_sts, read_text, text_units, wikitext_articles, wikitext_half
from layerfold.jobs.demo import default_model_path
from layerfold.evaluation.metrics import (
    embedding_fidelity,
    next_token_fidelity,
    perplexity,
    spearman_x100,
    speed,
)

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "model": str,
    "method": str,
    "options": dict,
    "keep": float,
    "keep_blocks": float,
    "unique_params": int,
    "metric": str,
    "value": float,
    "healed": bool,
    "seconds": float,
    "budget": dict,
}
# A run that could not meet its budget (e.g. LaCo finding no merge above its threshold) says why instead.
MEASURED = ("keep", "keep_blocks", "unique_params", "value")


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    model = build_tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each of the 128 tokens has probability 1/128
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, max_length=64, stride=16)
    assert result["value"] == pytest.approx(128, rel=1e-5)
    assert result["settings"]["scored"] == 299 and result["settings"]["stride"] == 16


def test_sliding_window_with_full_context_equals_plain_cross_entropy():
    model = build_tiny("llama")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0, :-1]
    expected = math.exp(F.cross_entropy(logits, ids[1:]).item())
    assert perplexity(model, ids, max_length=64, stride=64)["value"] == pytest.approx(expected, rel=1e-5)
    # Shorter windows see less context but still score every token exactly once.
    assert perplexity(model, ids, max_length=16, stride=8)["settings"]["scored"] == 39


def test_spearman_of_known_rankings():
    assert spearman_x100([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(100)
    assert spearman_x100([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-100)
    # Ranks (1,3,2,4) against (1,2,3,4): 1 - 6*2/(4*15) = 0.8
    assert spearman_x100([0.1, 0.9, 0.5, 1.0], [1, 2, 3, 4]) == pytest.approx(80)


def test_fidelity_of_a_model_to_itself_is_perfect():
    model = build_tiny("llama")
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(2))
    result = next_token_fidelity(model, model, ids, max_length=32)
    assert result["value"] == pytest.approx(0, abs=1e-6) and result["top1_agreement"] == 1.0
    embeddings = F.normalize(torch.randn(5, 8), dim=-1)
    assert embedding_fidelity(embeddings, embeddings)["mean"] == pytest.approx(1.0)


def test_unique_parameters_of_a_hand_built_module():
    shared = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(4, 4, bias=False))
    model.append(torch.nn.Linear(3, 4))
    model[3].weight = shared.weight  # tied: counted once
    assert layerfold.unique_parameters(model) == (12 + 4) + 16 + 4


def test_wikitext_is_split_into_articles_and_halves(tmp_path):
    text = (
        " = A = \r\n alpha text\r\n = = Section = = \r\n more\r\n"
        " = B = \r\n beta\r\n = C = \r\n gamma\r\n = D = \r\n delta\r\n"
    )
    articles = wikitext_articles(text.replace("\r\n", "\n"))
    assert [a.splitlines()[0] for a in articles] == [" = A = ", " = B = ", " = C = ", " = D = "]
    assert "= = Section = =" in articles[0]
    path = tmp_path / "wiki.raw"
    path.write_bytes(text.encode())
    assert "\r" not in read_text(path)
    first, second = wikitext_half(path, "first"), wikitext_half(path, "second")
    assert first + second == read_text(path)  # cut at the middle character, nothing lost or repeated
    assert abs(len(first) - len(second)) <= 1
    assert "alpha" in first and "delta" in second and "alpha" not in second


def test_sts_reader_and_text_units(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("g\tf\t2012\t1\t2.5\tA cat sits.\tA cat is sitting.\ng\tf\t2012\t2\t0.0\tRain.\tA car.\n")
    pairs = read_sts(path)
    assert [(p.score, p.first) for p in pairs] == [(2.5, "A cat sits."), (0.0, "Rain.")]
    assert text_units(path) == ["A cat sits.", "A cat is sitting.", "Rain.", "A car."]
    bad = tmp_path / "bad.csv"
    bad.write_text("only\tthree\tcolumns\n")
    with pytest.raises(LayerfoldError, match=r"bad.csv:1: not an STS-B line"):
        read_sts(bad)


@pytest.mark.parametrize(
    "content, message", [(None, "data file not found"), (b"  \n", "data file is empty"), (b"\xff\xfe\x00", "not UTF-8")]
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LayerfoldError, match=message):
        read_text(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("eval"))
    (root / "text.txt").write_text(
        "The quick brown fox jumps over the lazy dog.\n\nA second paragraph of text here.\n" * 20
    )
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_json_has_task_metric_value_and_settings(capsys, saved):
    code, out, _ = run(
        capsys,
        "eval",
        saved / "llama",
        "--task",
        "ppl",
        "--data",
        saved / "text.txt",
        "--max-tokens",
        "100",
        "--max-length",
        "32",
        "--stride",
        "16",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["task"] == "ppl" and result["metric"] == "perplexity" and result["value"] > 1
    assert result["settings"] == {"max_length": 32, "stride": 16, "tokens": 100, "scored": 99}


def test_eval_size_and_speed(capsys, saved):
    code, out, _ = run(capsys, "eval", saved / "bert", "--task", "size", "--json")
    result = json.loads(out)
    assert code == 0 and result["value"] == result["parameters"]["total"]
    assert result["bytes_on_disk"] == (saved / "bert" / "model.safetensors").stat().st_size
    assert result["peak_rss_bytes"] >= result["rss_before_load_bytes"] > 0
    model = layerfold.load_source(saved / "bert")
    from layerfold.checkpoints.folded import load_tokenizer

    result = speed(model, load_tokenizer(saved / "bert"), ["some words"] * 40, repeats=2)
    assert result["metric"] == "sentences_per_second" and result["value"] > 0 and len(result["runs"]) == 2


def test_eval_fidelity_of_a_fold_against_its_original(capsys, saved, tmp_path):
    assert (
        run(
            capsys,
            "fold",
            saved / "bert",
            "--out",
            tmp_path / "f",
            "--strategy",
            "cycle",
            "--unique",
            "2",
            "--rank",
            "full",
        )[0]
        == 0
    )
    code, out, _ = run(
        capsys,
        "eval",
        tmp_path / "f",
        "--task",
        "fidelity",
        "--reference",
        saved / "bert",
        "--data",
        saved / "text.txt",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["metric"] == "cosine" and result["value"] > 0.99999


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["{bert}", "--task", "ppl", "--data", "{text}"],
            "task ppl needs a causal language model; BertModel is an encoder",
        ),
        (["{llama}", "--task", "sts", "--data", "{text}"], "task sts needs an encoder"),
        (["{llama}", "--task", "ppl", "--data", "{missing}"], "data file not found"),
        (["{llama}", "--task", "ppl", "--data", "{empty}"], "data file is empty"),
        (["{llama}", "--task", "ppl"], "task ppl needs --data PATH"),
        (["{llama}", "--task", "fidelity", "--data", "{text}"], "task fidelity needs --reference"),
        (["{bert}", "--task", "sts", "--data", "{text}"], "not an STS-B file"),
        (["{llama}", "--task", "bleu"], "'bleu' is not one of"),
    ],
)
def test_eval_bad_input_is_one_line(capsys, saved, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    values = dict(
        bert=saved / "bert",
        llama=saved / "llama",
        text=saved / "text.txt",
        missing=tmp_path / "nope.txt",
        empty=tmp_path / "empty.txt",
    )
    code, _, err = run(capsys, "eval", *[a.format(**values) for a in args])
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("layerfold: error: ") and message in err


def test_a_registered_task_is_measured_by_eval_with_its_needs_checked_first(saved, monkeypatch):
    """A new measurement is one EvalTask: evaluate_path checks what it says it needs before the model loads,
    refuses the wrong kind of model, and returns its result."""
    from layerfold.evaluation import tasks as eval_tasks
    from layerfold.jobs.evaluate import evaluate_path

    def layer_count(model, m):
        return {"task": "layers", "metric": "layers", "value": model.config.num_hidden_layers, "settings": {}}

    task = eval_tasks.EvalTask("layers", "how many blocks", layer_count, needs_data=True, causal=False)
    monkeypatch.setitem(eval_tasks.TASKS, "layers", task)
    with pytest.raises(LayerfoldError, match="task layers needs --data PATH"):
        evaluate_path(saved / "bert", "layers")
    with pytest.raises(LayerfoldError, match="task layers needs an encoder"):
        evaluate_path(saved / "llama", "layers", data=saved / "text.txt")
    report = evaluate_path(saved / "bert", "layers", data=saved / "text.txt")
    assert report.to_dict()["value"] == 4 and report.to_dict()["task"] == "layers"


@pytest.mark.parametrize("name", ["latest.json", "quick/latest.json"])
def test_benchmark_results_follow_the_schema(name):
    path = ROOT / "benchmarks" / "results" / name
    if not path.is_file():
        pytest.skip(f"{name} not written yet (make bench / make bench-quick)")
    payload = json.loads(path.read_text())
    assert {"date", "machine", "rows"} <= set(payload)
    assert payload["rows"]
    for row in payload["rows"]:
        failed = row["value"] is None
        for key, kind in ROW_KEYS.items():
            if failed and key in MEASURED:
                assert row[key] is None and isinstance(row["error"], str) and row["error"], row
                continue
            assert isinstance(row[key], (int, float) if kind is float else kind), (key, row)
        assert row["model"] in ("all-MiniLM-L6-v2", "SmolLM2-135M", "all-mpnet-base-v2", "gemma-3-270m")
        if not failed and "runtime" in row:  # rows written since issue 17: run-time cost beside the quality
            speed = "decode_tokens_per_second" if row["metric"] == "perplexity" else "sentences_per_second"
            assert row["runtime"][speed] > 0 and row["runtime"]["peak_rss_bytes"] > 0, row
            assert row["runtime"]["ratios"][speed] > 0, row
        assert row["metric"] in ("spearman", "perplexity")
        assert row["budget"]["counts"] in ("all", "blocks") and 0 < row["budget"]["fraction"] <= 1
        assert failed or (0 < row["keep"] and 0 < row["keep_blocks"])
    from layerfold.methods.registry import REGISTRY

    assert {row["method"] for row in payload["rows"]} <= set(REGISTRY)


@pytest.mark.slow
def test_minilm_scores_the_published_sts_b_figure(capsys):
    data = ROOT.parent / "shared" / "data" / "stsbenchmark" / "sts-test.csv"
    code, out, _ = run(capsys, "eval", default_model_path(), "--task", "sts", "--data", data, "--json")
    assert code == 0 and round(json.loads(out)["value"], 2) == 82.03


def test_runtime_cost_of_a_fold_in_a_fresh_process(tmp_path):
    """Decoders: decode and prefill tokens/s and peak RSS; encoders: sentences/s. Measured in a fresh process that
    loads the folded checkpoint (so it runs the folded modules, not a materialised copy)."""
    from conftest import save_tiny_with_tokenizer

    import layerfold
    from layerfold.evaluation.metrics import QUICK_RUNTIME_PROTOCOL, runtime_cost

    save_tiny_with_tokenizer(tmp_path)
    for name in ("llama", "bert"):
        model = layerfold.fold(layerfold.load_source(tmp_path / name), layerfold.FoldPlan.cycle(4, 2), progress=False)
        layerfold.save(model, tmp_path / f"{name}-folded", source=tmp_path / name)
    decoder = runtime_cost(tmp_path / "llama-folded", token_ids=list(range(5, 300)), quick=True)
    assert decoder["decode_tokens_per_second"] > 0 and decoder["prefill_tokens_per_second"] > 0
    assert decoder["peak_rss_bytes"] >= decoder["rss_after_load_bytes"] >= decoder["rss_after_imports_bytes"] > 0
    assert decoder["protocol"] == QUICK_RUNTIME_PROTOCOL and "sentences_per_second" not in decoder
    encoder = runtime_cost(tmp_path / "bert-folded", texts=["a sentence", "another one"] * 10, quick=True)
    assert encoder["sentences_per_second"] > 0 and "decode_tokens_per_second" not in encoder


def tiny_glue(root: Path) -> Path:
    """A folder in the layout of ../shared/data/glue with a few rows of each dev file."""
    (root / "SST-2").mkdir(parents=True)
    (root / "RTE").mkdir()
    (root / "SST-2" / "dev.tsv").write_text(
        "text\tlabel\nit 's a charming and often affecting journey . \t1\nunflinchingly bleak and desperate \t0\n"
        'a "quoted" word , and a bad film \t0\n'
    )
    (root / "RTE" / "dev.tsv").write_text(
        "sentence1\tsentence2\tlabel\tidx\nA cat sat on the mat.\tA cat sat.\t0\t0\nIt rained all day.\tThe sun shone.\t1\t1\n"
    )
    return root


def test_lm_eval_on_the_local_glue_tasks(capsys, tmp_path):
    """lm-eval's Python API on the shipped SST-2 and RTE definitions, reading the local files (nothing from the Hub):
    a folded model is evaluated in memory, and the counts are the files' rows."""
    pytest.importorskip("lm_eval")
    save_tiny_with_tokenizer(tmp_path, names=("llama",))
    model = layerfold.fold(layerfold.load_source(tmp_path / "llama"), layerfold.FoldPlan.cycle(4, 2), progress=False)
    layerfold.save(model, tmp_path / "folded", source=tmp_path / "llama")
    glue = tiny_glue(tmp_path / "glue")
    code, out, err = run(capsys, "eval", tmp_path / "folded", "--task", "lm-eval", "--data", glue, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["examples"] == {"glue_sst2_dev": 3, "glue_rte_dev": 2}
    assert all(0 <= a <= 1 for a in result["accuracies"].values())
    assert result["value"] == pytest.approx(sum(result["accuracies"].values()) / 2)
    code, out, err = run(capsys, "eval", tmp_path / "folded", "--task", "lm-eval", "--data", glue,
                         "--tasks", "glue_rte_dev", "--limit", "1", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["examples"] == {"glue_rte_dev": 1}, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "mmlu"], "unknown lm-eval task 'mmlu'"),
        (["--data", "MISSING"], "no RTE/dev.tsv"),
        ([], "needs --data DIR"),
    ],
)
def test_lm_eval_bad_input_is_one_line_before_the_model_loads(capsys, tmp_path, extra, message):
    extra = [str(tmp_path / "empty") if a == "MISSING" else a for a in extra]
    (tmp_path / "empty").mkdir()
    if "--tasks" in extra:
        extra += ["--data", str(tmp_path / "empty")]
    code, _, err = run(capsys, "eval", tmp_path / "no-model-needed", "--task", "lm-eval", *extra)
    assert code != 0 and message in err and "Traceback" not in err
