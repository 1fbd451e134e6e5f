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

import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, bench_parser, merge_models, smollm2_dir, write_results
from tasks import WIKITEXT, Task, fidelity_to_original, minilm_dev
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.checkpoints.folded import load_source, load_tokenizer
from layerfold.core.budget import Budget
from layerfold.core.report import markdown_table
from layerfold.core.texts import pydoc_paragraphs, wikitext_half
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.evaluation.metrics import perplexity

METHODS = [("svd", {"allocation": "sensitivity", "whole": [0, -1]}), ("basis", {"allocation": "uniform"})]
DEV_TOKENS = 4096


def tail_ids(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The last ``tokens`` tokens of a text (calibration reads the first ones)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][-tokens:]


def decoder(work: Path, quick: bool) -> tuple[Task, dict, Budget]:
    """SmolLM2 at 84 % of all parameters, and its calibration sources by label."""
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    wikitext = wikitext_half(WIKITEXT, "first")
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

    def perplexity_on(ids: torch.Tensor):
        return lambda model, _: perplexity(model, ids, max_length=1024, stride=1024)["value"]

    task = Task("SmolLM2-135M", path, "WikiText dev", False, f"the last {DEV_TOKENS} tokens of WikiText's first half",
                {name: perplexity_on(ids) for name, ids in dev.items()}, work / "wikitext.txt", "WikiText", 65536)
    sources = {"WikiText": [work / "wikitext.txt"],
               "WikiText + Shakespeare": [work / "wikitext.txt", work / "shakespeare.txt"],
               "WikiText + pydoc": [work / "wikitext.txt", work / "pydoc.txt"]}  # fmt: skip
    return task, sources, Budget(0.84)


def encoder(work: Path, quick: bool) -> tuple[Task, dict, Budget]:
    """MiniLM at half its block parameters (the development task of tasks.py: STS-B dev, the cosine to the
    original on WikiText first-half paragraphs, and on pydoc paragraphs), and its calibration sources by label."""
    task = minilm_dev(one_domain=True, quick=quick)
    (work / "wikitext.txt").write_text(wikitext_half(WIKITEXT, "first"))
    (work / "pydoc.txt").write_text("\n".join(pydoc_paragraphs(100_000, min_words=8)[256:]))
    pydoc = fidelity_to_original(task.tokenizer, pydoc_paragraphs(64 if quick else 256, min_words=8))
    task = task.keeping("STS-B dev", **{"WikiText dev cosine": task.measures["WikiText cosine"], "pydoc cosine": pydoc})
    train = task.calibration
    sources = {"STS-B train": [train], "STS-B train + WikiText": [train, work / "wikitext.txt"],
               "STS-B train + pydoc": [train, work / "pydoc.txt"]}
    return task, sources, Budget(0.5, blocks_only=True)


def run(task: Task, sources: dict, budget: Budget, only: set[str] | None, methods=METHODS) -> list[dict]:
    original = load_source(task.path, dtype=torch.float32)
    tokenizer = task.tokenizer
    rows = [{"model": task.model, "method": "original", "calibration": "", **task.figures(original, original)}]
    for label, files in sources.items():
        if only is not None and label not in only:
            continue
        start = time.perf_counter()
        source = files[0] if len(files) == 1 else files
        calibration = Calibration(
            original, calibration_batches(original, tokenizer, source, tokens=task.tokens), {"data": label}
        )
        calibration.statistics()
        seconds = time.perf_counter() - start
        for name, options in tqdm(methods, desc=f"{task.model}, {label}", unit="method"):
            folded = registry.build(registry.get(name), copy.deepcopy(original), budget, calibration, **options)
            rows.append({"model": task.model, "method": name, "options": options, "calibration": label,
                         "calibration_seconds": round(seconds, 1), **task.figures(folded, original)})  # fmt: skip
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
    results = merge_models(old["results"], new["results"], key=lambda row: (row["method"], row["calibration"]))
    return {**new, "results": results}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--calibrations", default=None, help="comma-separated labels: run only these rows and "
                        "replace them in results/calib_mix.json")  # fmt: skip
    args = parser.parse_args()
    # --quick (CI's smoke test): MiniLM calibrated on a mix, svd only, 300 dev pairs, 8,192 tokens
    only = set(args.calibrations.split(",")) if args.calibrations else {"STS-B train + pydoc"} if args.quick else None
    torch.manual_seed(0)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="layerfold-mix-") as tmp:
        for make in (encoder,) if args.quick else (encoder, decoder):
            work = Path(tmp) / make.__name__
            work.mkdir()
            task, sources, budget = make(work, args.quick)
            results.append({"model": task.model, "budget": budget.option + f" {budget.keep:g}", "tokens": task.tokens,
                            "rows": run(task, sources, budget, only, METHODS[:1] if args.quick else METHODS)})  # fmt: skip
    payload = {"seconds": round(time.perf_counter() - start), "results": results}
    if only is not None and not args.quick and (RESULTS / "calib_mix.json").is_file():
        payload = merged(json.loads((RESULTS / "calib_mix.json").read_text()), payload)
        results = payload["results"]
    markdown = render(results)
    write_results("calib_mix", payload, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
