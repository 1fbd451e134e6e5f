"""One text loader for every command: calibration, heal, analysis and eval read the same formats the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_with_tokenizer

import layerfold
from layerfold.engine.calibrate import calibration_batches
from layerfold.core.texts import pydoc_paragraphs, read_documents, text_units
from layerfold.core.errors import LayerfoldError
from layerfold.heal.data import prepare_data
from layerfold.checkpoints.folded import load_tokenizer

STS_LINE = "main-captions\tMSRvid\t2012test\t0001\t{score}\t{a}\t{b}\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same paragraphs as plain text, .jsonl and a datasets folder; tiny models with a real tokenizer."""
    import datasets

    root = save_tiny_with_tokenizer(tmp_path_factory.mktemp("loader"))
    paragraphs = pydoc_paragraphs(60)
    (root / "text.txt").write_text("\n\n".join(paragraphs))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    datasets.Dataset.from_dict({"text": paragraphs}).save_to_disk(str(root / "dataset"))
    (root / "sts.tsv").write_text("".join(STS_LINE.format(score=i % 5, a=p[:80], b=p[-80:]) for i, p in enumerate(paragraphs)))
    return root, paragraphs


def test_read_documents_reads_every_format(sources):
    root, paragraphs = sources
    assert read_documents(root / "docs.jsonl") == (paragraphs, "jsonl")
    assert read_documents(root / "dataset") == (paragraphs, "datasets")
    assert read_documents(root / "text.txt")[1] == "text"
    texts, kind = read_documents(root / "sts.tsv")
    assert kind == "sts" and texts[:2] == [paragraphs[0][:80], paragraphs[0][-80:]]
    assert text_units(root / "docs.jsonl") == text_units(root / "text.txt") == paragraphs


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_calibration_reads_a_path_in_any_format_like_its_documents(sources, name):
    root, paragraphs = sources
    model = layerfold.load_source(root / name)
    tokenizer = load_tokenizer(root / name)

    def batches(source):
        return calibration_batches(model, tokenizer, source, tokens=2048, window=64 if name == "llama" else None)

    given = batches(paragraphs)
    for path in (root / "docs.jsonl", root / "dataset"):
        got = batches(path)
        assert len(got) == len(given)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, given))


def test_fold_calib_takes_jsonl_and_a_datasets_folder(sources, tmp_path):
    from layerfold.cli.commands import main

    root, _ = sources
    for source in ("docs.jsonl", "dataset"):
        args = ["fold", root / "llama", "--out", tmp_path / source, "--method", "svd", "--keep-blocks", "0.5"]
        assert main([str(a) for a in args + ["--calib", root / source, "--calib-tokens", "2048"]]) == 0
    first, second = (layerfold.load(tmp_path / s) for s in ("docs.jsonl", "dataset"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ---- a mix of domains: repeated --calib / --data --------------------------------------------------------------
def numbers_text(lines: int = 400) -> str:
    """A second domain, unlike the pydoc paragraphs: lines of numbers and symbols."""
    return "\n".join(" ".join(f"{i * 7 + j} + {j} = {i * 7 + 2 * j} ;" for j in range(8)) for i in range(lines))


@pytest.fixture(scope="module")
def mix(sources):
    root, _ = sources
    (root / "numbers.txt").write_text(numbers_text())
    return root, [root / "text.txt", root / "numbers.txt"]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_mix_of_files_calibrates_on_an_equal_share_of_each_interleaved(mix, name):
    root, files = mix
    model = layerfold.load_source(root / name)
    tokenizer = load_tokenizer(root / name)

    def batches(source, tokens):
        window = 64 if name == "llama" else None
        return calibration_batches(model, tokenizer, source, tokens=tokens, window=window, batch_size=8)

    mixed = batches(files, 4096)
    first, second = batches(files[0], 2048), batches(files[1], 2048)
    assert len(mixed) == len(first) + len(second) and len(first) > 1 and len(second) > 1
    # Round robin: a batch of the first file, then one of the second, ...
    expected = [b for pair in zip(first, second) for b in pair] + first[len(second):] + second[len(first):]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(mixed, expected))
    assert not torch.equal(mixed[0]["input_ids"], mixed[1]["input_ids"])
    # A list of one file is that file.
    one = batches([files[0]], 2048)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, first)) and len(one) == len(first)


def test_a_mix_too_small_for_its_files_is_refused_in_one_line(mix):
    root, files = mix
    model = layerfold.load_source(root / "llama")
    with pytest.raises(LayerfoldError, match=r"over 2 data files is 250 tokens each; each needs at least 256") as err:
        calibration_batches(model, load_tokenizer(root / "llama"), files, tokens=500)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,causal", [("llama", True), ("bert", False)])
def test_heal_data_from_a_mix_shares_the_held_out_slice_and_interleaves_training(mix, name, causal):
    root, files = mix
    tokenizer = load_tokenizer(root / name)
    args = dict(causal=causal, seq_len=32, limit=None)
    mixed = prepare_data(tokenizer, files, held_out=5, **args)
    first, second = (prepare_data(tokenizer, f, held_out=h, **args) for f, h in zip(files, (3, 2)))
    assert [t.tolist() for t in mixed.held_out] == [t.tolist() for t in first.held_out + second.held_out]
    assert mixed.held_out_texts == first.held_out_texts + second.held_out_texts
    assert [t.tolist() for t in mixed.train[:4]] == [t.tolist() for t in
                                                     (first.train[0], second.train[0], first.train[1], second.train[1])]
    assert len(mixed.train) == len(first.train) + len(second.train)
    assert mixed.tokens == first.tokens + second.tokens and mixed.kind == "text"
    limited = prepare_data(tokenizer, files, held_out=5, causal=causal, seq_len=32, limit=6)
    assert [t.tolist() for t in limited.train] == [t.tolist() for t in mixed.train[:6]]
    kinds = prepare_data(tokenizer, [root / "docs.jsonl", root / "sts.tsv"], held_out=2, **args).kind
    assert kinds == "mix of jsonl, sts"


def test_fold_and_heal_take_repeated_calib_and_data(mix, tmp_path, capsys):
    from layerfold.cli.commands import main

    root, files = mix
    fold = ["fold", root / "llama", "--out", tmp_path / "svd", "--method", "svd", "--keep-blocks", "0.5",
            "--calib", files[0], "--calib", files[1], "--calib-tokens", "2048", "--json"]  # fmt: skip
    assert main([str(a) for a in fold]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["data"] == f"{files[0]} + {files[1]}"
    heal = ["heal", tmp_path / "svd", "--teacher", root / "llama", "--data", files[0], "--data", files[1],
            "--out", tmp_path / "healed", "--steps", "2", "--batch", "2", "--seq-len", "32", "--eval-examples", "4",
            "--stage", "both", "--block-steps", "2", "--block-tokens", "512", "--json"]  # fmt: skip
    assert main([str(a) for a in heal]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["path"] == f"{files[0]} + {files[1]}" and report["data"]["held_out_examples"] == 4
    assert layerfold.load(tmp_path / "healed") is not None


def test_an_output_over_a_file_of_the_mix_is_refused(mix, tmp_path, capsys):
    from layerfold.cli.commands import main

    root, files = mix
    fold = ["fold", root / "llama", "--out", files[1], "--method", "svd", "--keep-blocks", "0.5",
            "--calib", files[0], "--calib", files[1]]  # fmt: skip
    assert main([str(a) for a in fold]) != 0
    err = capsys.readouterr().err.strip()
    assert "is the calibration text" in err and len(err.splitlines()) == 1 and files[1].is_file()
