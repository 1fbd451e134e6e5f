"""One text loader for every command: calibration, heal, analysis and eval read the same formats the same way."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_with_tokenizer

import layerfold
from layerfold.calibrate import calibration_batches
from layerfold.data import pydoc_paragraphs, read_documents, text_units
from layerfold.io import load_tokenizer

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
    from layerfold.cli import main

    root, _ = sources
    for source in ("docs.jsonl", "dataset"):
        args = ["fold", root / "llama", "--out", tmp_path / source, "--method", "svd", "--keep-blocks", "0.5"]
        assert main([str(a) for a in args + ["--calib", root / source, "--calib-tokens", "2048"]]) == 0
    first, second = (layerfold.load(tmp_path / s) for s in ("docs.jsonl", "dataset"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
