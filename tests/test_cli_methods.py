"""`layerfold fold --method ... --keep ... --calib ...` on tiny models with a real tokenizer."""

import json

import pytest
from conftest import save_tiny_with_tokenizer

from layerfold.cli.commands import main
from layerfold.jobs.demo import pydoc_paragraphs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("methods"))
    (root / "calib.txt").write_text("\n\n".join(pydoc_paragraphs(40)))
    (root / "short.txt").write_text("Too short to calibrate anything.\n")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 100)
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize(
    "method, extra",
    [("basis", []), ("svd", ["--allocation", "sensitivity", "--whole", "0,-1"]), ("shortgpt", []), ("laco", [])],
)
def test_fold_with_a_method_at_a_budget(capsys, saved, tmp_path, model, method, extra):
    if method == "laco":
        extra = ["--threshold", "-1"]  # tiny random models: accept every merge
    code, out, err = run(
        capsys,
        "fold",
        saved / model,
        "--method",
        method,
        "--keep-blocks",
        "0.6",
        "--calib",
        saved / "calib.txt",
        "--calib-tokens",
        "2048",
        "--calib-window",
        "128",
        "--out",
        tmp_path / "out",
        "--json",
        *extra,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["method"] == method and report["budget"] == {"fraction": 0.6, "counts": "blocks"}
    assert 0.5 <= report["keep_blocks"] <= 0.6 + 1e-9 and 0.5 < report["keep"] < 1
    assert report["calibration"]["tokens"] >= 256
    assert report["plan"]["provenance"]["method"] == method
    code, out, _ = run(capsys, "info", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["parameters"] == report["after"]["parameters"]


def test_markdown_report_states_both_fractions(capsys, saved, tmp_path):
    code, out, _ = run(
        capsys, "fold", saved / "llama", "--method", "svd", "--keep", "0.99", "--calib", saved / "calib.txt",
        "--calib-window", "128", "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0
    assert "Budget: 0.99 of the unique parameters; kept" in out and "of the block parameters" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "svd", "--keep", "0.8", "--calib", "{empty}"], "data file is empty"),
        (["--method", "svd", "--keep", "0.8", "--calib", "{short}"], "calibration data too short"),
        (["--method", "svd", "--keep", "0.8", "--calib", "{latin1}"], "not UTF-8"),
        (["--method", "svd", "--keep", "0.8", "--calib", "{missing}"], "data file not found"),
        (["--method", "basis", "--keep", "0.01", "--calib", "{calib}"], "--keep 0.01 cannot be met"),
        (["--method", "shortgpt", "--keep", "0.01", "--calib", "{calib}"], "--keep 0.01 cannot be met"),
        (["--method", "svd", "--keep", "1.5", "--calib", "{calib}"], "--keep: must be a fraction in (0, 1]"),
        (["--method", "svd", "--keep", "0.8"], "needs calibration text: --calib PATH"),
        (["--method", "svd", "--calib", "{calib}"], "exactly one of --keep F or --keep-blocks F"),
        (["--method", "basis", "--keep", "0.8", "--calib", "{calib}", "--shared", "c_attn"], "not a projection of"),
        (["--method", "svd", "--keep", "0.8", "--calib", "{calib}", "--score", "angular"], "does not take --score"),
        (["--method", "squeeze", "--keep", "0.8"], "unknown method 'squeeze'"),
        (["--method", "svd", "--keep", "0.8", "--strategy", "cycle"], "does not go with --plan, --strategy"),
        (["--strategy", "cycle", "--unique", "2", "--keep", "0.8"], "need --method"),
    ],
)
def test_bad_method_input_is_one_line_and_writes_nothing(capsys, saved, tmp_path, args, message):
    values = {name: saved / f"{name}.txt" for name in ("calib", "short", "empty", "latin1")}
    values["missing"] = tmp_path / "nope.txt"
    out = tmp_path / "out"
    code, _, err = run(capsys, "fold", saved / "llama", "--out", out, *[a.format(**values) for a in args])
    assert code != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("layerfold: error: ") and message in last, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_method_on_an_unsupported_architecture(capsys, saved, tmp_path):
    import transformers as T

    config = T.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=30522)
    T.DistilBertModel(config).save_pretrained(tmp_path / "distil")
    code, _, err = run(
        capsys, "fold", tmp_path / "distil", "--method", "svd", "--keep", "0.8", "--calib", saved / "calib.txt",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert code != 0 and "unsupported architecture: model type 'distilbert'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", [["--strategy", "cycle", "--unique", "2"], ["--method", "tie-cycle", "--keep-blocks", "0.5"]])
def test_tie_relaxations_are_whitened_by_default_with_calibration_text(capsys, saved, tmp_path, how):
    calib = ["--calib", saved / "calib.txt", "--calib-tokens", "512"]
    code, out, err = run(capsys, "fold", saved / "llama", "--out", tmp_path / "f", *how, "--rank", "2", *calib,
                         "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert "fit=average, rank=2, whitened relaxations" in report["plan_summary"]
    assert all(op["whiten"] and op["fit"] == "mean" for op in report["plan"]["operations"] if op["op"] == "tie")
    # Asked for: a least-squares fit, and relaxations as Relaxed Recursive Transformers initialise them.
    code, out, err = run(capsys, "fold", saved / "llama", "--out", tmp_path / "g", *how, "--rank", "2", *calib,
                         "--fit", "lstsq", "--no-whiten", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    ties = [op for op in report["plan"]["operations"] if op["op"] == "tie"]
    assert ties and all(op["fit"] == "lstsq" and not op["whiten"] for op in ties)
    assert report["plan"]["provenance"]["sequential"] is False  # off unless asked for
    code, out, err = run(capsys, "fold", saved / "llama", "--out", tmp_path / "h", *how, "--rank", "2", *calib,
                         "--sequential", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["plan"]["provenance"]["sequential"] is True
