"""Calibrating on one domain or on a mix, measured on development data only (issue 18, build item 4).

    python benchmarks/calib_mix.py            # make bench (about 25 minutes here)
    python benchmarks/calib_mix.py --calibrations "STS-B train + pydoc,WikiText + pydoc"   # only these rows

The calibrated folds of the sweep (whitened svd and basis) on each real model, calibrated on the sweep's
single domain, or on an equal mix of it and a second domain, with the same number of tokens:

- SmolLM2-135M, 84 % of all parameters: WikiText-2 (first half of the test file) alone, or half WikiText and
  half Tiny Shakespeare (its first half) or pydoc_data.topics (its paragraphs after the first 200). Perplexity
  on three dev texts: the last 4,096 tokens of WikiText's first half and of Shakespeare's first half (no
  calibration reads them: it takes the first tokens of each file), and the first 4,096 tokens of pydoc's
  paragraphs.
- all-MiniLM-L6-v2, 50 % of the block parameters: STS-B train sentences alone, or half those and half WikiText
  paragraphs (first half) or pydoc paragraphs (after the first 256). STS-B dev Spearman; cosine to the
  original's embeddings of the last 256 paragraphs of WikiText's first half and of the first 256 pydoc
  paragraphs.

A column is off-domain for a row when its text is unlike every file of that row's calibration.

Nothing here reads an evaluation set (STS-B test, the second halves). Writes benchmarks/results/calib_mix.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, model_tasks, smollm2_dir, write_results
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.core.texts import pydoc_paragraphs, read_sts, text_lines, wikitext_half
from layerfold.jobs.demo import default_model_path
from layerfold.evaluation.metrics import embedding_fidelity, perplexity, sentence_embeddings, sts_spearman
from layerfold.checkpoints.folded import load_source, load_tokenizer
from layerfold.core.report import markdown_table

METHODS = [("svd", {"allocation": "sensitivity", "whole": [0, -1]}), ("basis", {"allocation": "uniform"})]
DEV_TOKENS = 4096


def tail_ids(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The last ``tokens`` tokens of a text (calibration reads the first ones)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][-tokens:]


def decoder(work: Path) -> dict:
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    wikitext = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    shakespeare = text[: len(text) // 2]
    (work / "wikitext.txt").write_text(wikitext)
    (work / "shakespeare.txt").write_text(shakespeare)
    (work / "pydoc.txt").write_text("\n\n".join(pydoc_paragraphs(100_000)[200:]))
    dev = {
        "WikiText dev": tail_ids(tokenizer, wikitext, DEV_TOKENS),
        "Shakespeare dev": tail_ids(tokenizer, shakespeare, DEV_TOKENS),
        "pydoc": tokenizer("\n\n".join(pydoc_paragraphs(2000)), return_tensors="pt").input_ids[0][:DEV_TOKENS],
    }

    def measure(model, original) -> dict:
        return {name: perplexity(model, ids, max_length=1024, stride=1024)["value"] for name, ids in dev.items()}

    return {
        "model": "SmolLM2-135M",
        "path": path,
        "budget": Budget(0.84),
        "tokens": 65536,
        "sources": {"WikiText": [work / "wikitext.txt"],
                    "WikiText + Shakespeare": [work / "wikitext.txt", work / "shakespeare.txt"],
                    "WikiText + pydoc": [work / "wikitext.txt", work / "pydoc.txt"]},
        "measure": measure,
        "lower_is_better": True,
    }  # fmt: skip


def encoder(work: Path) -> dict:
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    pairs = read_sts(DATA / "stsbenchmark" / "sts-dev.csv")
    wikitext = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    (work / "wikitext.txt").write_text(wikitext)
    (work / "pydoc.txt").write_text("\n".join(pydoc_paragraphs(100_000, min_words=8)[256:]))
    paragraphs = {
        "WikiText dev cosine": [line for line in text_lines(wikitext) if len(line.split()) >= 8][-256:],
        "pydoc cosine": pydoc_paragraphs(256, min_words=8),
    }
    reference: dict[str, torch.Tensor] = {}

    def measure(model, original) -> dict:
        values = {"STS-B dev": sts_spearman(model, tokenizer, pairs)["value"]}
        for name, texts in paragraphs.items():
            if name not in reference:
                reference[name] = sentence_embeddings(original, tokenizer, texts)
            values[name] = embedding_fidelity(reference[name], sentence_embeddings(model, tokenizer, texts))["mean"]
        return values

    train = DATA / "stsbenchmark" / "sts-train.csv"
    return {
        "model": "all-MiniLM-L6-v2",
        "path": path,
        "budget": Budget(0.5, blocks_only=True),
        "tokens": 32768,
        "sources": {"STS-B train": [train], "STS-B train + WikiText": [train, work / "wikitext.txt"],
                    "STS-B train + pydoc": [train, work / "pydoc.txt"]},
        "measure": measure,
        "lower_is_better": False,
    }


def run(task: dict, only: set[str] | None) -> list[dict]:
    original = load_source(task["path"], dtype=torch.float32)
    tokenizer = load_tokenizer(task["path"])
    rows = [{"model": task["model"], "method": "original", "calibration": "", **task["measure"](original, original)}]
    for label, files in task["sources"].items():
        if only is not None and label not in only:
            continue
        start = time.perf_counter()
        source = files[0] if len(files) == 1 else files
        calibration = Calibration(
            original, calibration_batches(original, tokenizer, source, tokens=task["tokens"]), {"data": label}
        )
        calibration.statistics()
        seconds = time.perf_counter() - start
        for name, options in tqdm(METHODS, desc=f"{task['model']}, {label}", unit="method"):
            folded = registry.build(registry.get(name), copy.deepcopy(original), task["budget"], calibration, **options)
            rows.append({"model": task["model"], "method": name, "options": options, "calibration": label,
                         "calibration_seconds": round(seconds, 1), **task["measure"](folded, original)})  # fmt: skip
            tqdm.write(str(rows[-1]))
            del folded
    return rows


def render(results: list[dict]) -> str:
    about = "\n\n".join(__doc__.split("\n\n")[2:5])
    parts = ["# Calibration on one domain or on a mix (development data only)", "", about, ""]
    for result in results:
        rows = result["rows"]
        columns = [k for k in rows[0] if k not in ("model", "method", "calibration", "options")]
        parts += [f"## {result['model']}, {result['budget']} ({result['tokens']:,} calibration tokens)", ""]
        body = [[r["method"], r["calibration"], *(f"{r[c]:.4g}" for c in columns)] for r in rows]
        parts += [markdown_table(["method", "calibration", *columns], body), ""]
    return "\n".join(parts)


def merged(old: dict, new: dict) -> dict:
    """``new``'s rows in place of the old rows of the same model, method and calibration; the rest kept."""
    renamed = {"pydoc (neither)": "pydoc", "pydoc cosine (neither)": "pydoc cosine"}  # the first run's names
    results = []
    for fresh in new["results"]:
        before = next((r for r in old["results"] if r["model"] == fresh["model"]), {"rows": []})
        key = lambda row: (row["method"], row["calibration"])  # noqa: E731
        replaced = {key(row) for row in fresh["rows"]}
        kept = [{renamed.get(k, k): v for k, v in row.items()} for row in before["rows"] if key(row) not in replaced]
        rows = [r for r in fresh["rows"] if r["method"] == "original"] + [r for r in kept if r["method"] != "original"]
        rows += [r for r in fresh["rows"] if r["method"] != "original"]
        results.append({**fresh, "rows": rows})
    return {**new, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrations", default=None, help="comma-separated labels: run only these rows and "
                        "replace them in results/calib_mix.json")  # fmt: skip
    args = parser.parse_args()
    only = set(args.calibrations.split(",")) if args.calibrations else None
    torch.manual_seed(0)
    start = time.perf_counter()
    results = []
    for _, task in model_tasks((encoder, decoder), "layerfold-mix-"):
        results.append({"model": task["model"], "budget": task["budget"].option + f" {task['budget'].keep:g}",
                        "tokens": task["tokens"], "rows": run(task, only)})  # fmt: skip
    payload = {"seconds": round(time.perf_counter() - start), "results": results}
    if only is not None and (RESULTS / "calib_mix.json").is_file():
        payload = merged(json.loads((RESULTS / "calib_mix.json").read_text()), payload)
        results = payload["results"]
    markdown = render(results)
    write_results("calib_mix", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
