"""The end-to-end distillation loss of each model kind, chosen on development data (issue 18, build item 3).

    python benchmarks/loss_mix.py            # make bench (about 30 minutes here)

One calibrated fold per real model (whitened svd, ends whole, half the block parameters), healed end to end
from the same fold with each candidate loss mix and the heal benchmark's budget:

- all-MiniLM-L6-v2: heal data STS-B train sentences; STS-B dev Spearman, and cosine to the original's
  embeddings of the last 256 paragraphs of WikiText's first half (text unlike the heal data).
- SmolLM2-135M: heal and calibration text the first half of the WikiText-2 test file without its last
  30,000 characters; perplexity on those 30,000 characters (first 4,096 tokens) and on the last 4,096 tokens
  of Tiny Shakespeare's first half (unlike the heal data).

Nothing here reads an evaluation set (STS-B test, the second halves). The default of ``LossWeights.default``
is the mix with the best headline dev figure, unless it costs the off-domain dev figure more than it gains.
Writes benchmarks/results/loss_mix.{json,md}.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from common import DATA, model_tasks, smollm2_dir, write_results
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.core.texts import read_sts, text_lines, wikitext_half
from layerfold.jobs.demo import default_model_path
from layerfold.evaluation.metrics import embedding_fidelity, perplexity, sentence_embeddings, sts_spearman
from layerfold.heal import HealConfig, heal
from layerfold.heal.settings import LossWeights
from layerfold.checkpoints.folded import load, load_source, load_tokenizer, save
from layerfold.core.report import markdown_table

FOLD = ("svd", {"allocation": "sensitivity", "whole": [0, -1]})
DEV_CHARS = 30_000
DEV_TOKENS = 4096


def encoder(work: Path) -> dict:
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    pairs = read_sts(DATA / "stsbenchmark" / "sts-dev.csv")
    train = DATA / "stsbenchmark" / "sts-train.csv"
    wikitext = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    paragraphs = [line for line in text_lines(wikitext) if len(line.split()) >= 8][-256:]
    reference: list[torch.Tensor] = []

    def measure(model, original) -> dict:
        if not reference:
            reference.append(sentence_embeddings(original, tokenizer, paragraphs))
        fidelity = embedding_fidelity(reference[0], sentence_embeddings(model, tokenizer, paragraphs))["mean"]
        return {"STS-B dev": sts_spearman(model, tokenizer, pairs)["value"], "WikiText dev cosine": fidelity}

    return {
        "model": "all-MiniLM-L6-v2",
        "path": path,
        "heal_data": train,
        "calibration": [s for p in read_sts(train) for s in (p.first, p.second)],
        "tokens": 32768,
        "config": HealConfig(steps=150, batch=64, lr=2e-4, eval_every=50, seed=0, stage="e2e"),
        "mixes": ["cosine", "cosine=1,hidden=1", "hidden"],
        "measure": measure,
        "headline": "STS-B dev",
        "higher_is_better": True,
    }


def decoder(work: Path) -> dict:
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    first = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    heal_text, dev_text = first[:-DEV_CHARS], first[-DEV_CHARS:]
    heal_file = work / "wikitext-first-half-without-dev.txt"
    heal_file.write_text(heal_text)
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    shakespeare = shakespeare[: len(shakespeare) // 2]
    dev = {
        "WikiText dev": tokenizer(dev_text, return_tensors="pt").input_ids[0][:DEV_TOKENS],
        "Shakespeare dev": tokenizer(shakespeare, return_tensors="pt").input_ids[0][-DEV_TOKENS:],
    }

    def measure(model, original) -> dict:
        return {name: perplexity(model, ids, max_length=1024, stride=1024)["value"] for name, ids in dev.items()}

    return {
        "model": "SmolLM2-135M",
        "path": path,
        "heal_data": heal_file,
        "calibration": [heal_text],
        "tokens": 32768,
        "config": HealConfig(steps=24, batch=4, seq_len=512, lr=1e-4, eval_every=12, save_every=1000, seed=0,
                             stage="e2e"),  # fmt: skip
        "mixes": ["kl", "kl=1,lm=0.5"],
        "measure": measure,
        "headline": "WikiText dev",
        "higher_is_better": False,
    }


def run(task: dict, work: Path) -> list[dict]:
    original = load_source(task["path"], dtype=torch.float32)
    tokenizer = load_tokenizer(task["path"])
    batches = calibration_batches(original, tokenizer, task["calibration"], tokens=task["tokens"])
    calibration = Calibration(original, batches, {"data": "dev heal text"})
    name, options = FOLD
    folded = registry.build(registry.get(name), copy.deepcopy(original), Budget(0.5, blocks_only=True), calibration,
                            **options)  # fmt: skip
    folded_dir = work / "folded"
    save(folded, folded_dir, source=task["path"], overwrite=True)
    rows = [{"loss": "(original)", **task["measure"](original, original)},
            {"loss": "(training-free fold)", **task["measure"](folded, original)}]  # fmt: skip
    del folded
    for mix in tqdm(task["mixes"], desc=f"{task['model']} loss mixes", unit="mix"):
        config = dataclasses.replace(task["config"], loss=LossWeights.parse(mix))
        healed_dir = work / f"healed-{mix.replace('=', '').replace(',', '-')}"
        start = time.perf_counter()
        heal(folded_dir, task["path"], task["heal_data"], healed_dir, config, overwrite=True)
        seconds = time.perf_counter() - start
        rows.append({"loss": mix, **task["measure"](load(healed_dir), original), "heal_seconds": round(seconds, 1)})
        tqdm.write(str(rows[-1]))
    return rows


def choice(rows: list[dict], headline: str, higher_is_better: bool) -> dict:
    """The best mix on the headline dev figure, and the mix the rule of ``LossWeights.default`` picks: the
    largest sum of the signed log dev figures, so that a relative gain on the headline counts only if the
    off-domain dev figure loses less (e.g. perplexity 113 → 107 does not pay for 330 → 357)."""
    healed = [r for r in rows if not r["loss"].startswith("(")]
    sign = 1 if higher_is_better else -1
    figures = [k for k in healed[0] if k not in ("loss", "heal_seconds")]
    best = max(healed, key=lambda r: sign * r[headline])["loss"]
    chosen = max(healed, key=lambda r: sum(sign * math.log(r[k]) for k in figures))["loss"]
    return {"best": best, "chosen": chosen}


def render(results: list[dict]) -> str:
    parts = ["# End-to-end distillation loss per model kind (development data only)", "", __doc__.split("\n\n")[2],
             ""]  # fmt: skip
    for result in results:
        rows = result["rows"]
        columns = [k for k in rows[-1] if k != "loss"]
        parts += [f"## {result['model']}: {FOLD[0]} at half the block parameters, healed end to end "
                  f"({result['budget']})", ""]  # fmt: skip
        body = [[r["loss"], *(f"{r[c]:.4g}" if c in r else "" for c in columns)] for r in rows]
        parts += [markdown_table(["loss", *columns], body), ""]
        picked = choice(rows, result["headline"], result["higher_is_better"])
        parts += [f"Best on the headline dev figure ({result['headline']}): {picked['best']}. Chosen (best sum of "
                  f"signed log dev figures, both columns): **{picked['chosen']}**.", ""]  # fmt: skip
    return "\n".join(parts)


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    results = []
    for work, task in model_tasks((encoder, decoder), "layerfold-loss-"):
        rows = run(task, work)
        config = task["config"]
        window = f" × {config.seq_len} tokens" if config.seq_len else ""
        budget = f"{config.steps} steps × {config.batch}{window}"
        results.append({"model": task["model"], "headline": task["headline"],
                        "higher_is_better": task["higher_is_better"], "budget": budget, "rows": rows,
                        **choice(rows, task["headline"], task["higher_is_better"])})  # fmt: skip
    payload = {"seconds": round(time.perf_counter() - start), "results": results}
    markdown = render(results)
    write_results("loss_mix", payload, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
