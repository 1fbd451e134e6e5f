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
import tempfile
import time
from pathlib import Path

import torch
from common import bench_parser, write_results
from tasks import Task, minilm_dev, smollm2_dev
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.checkpoints.folded import load, load_source, save
from layerfold.core.budget import Budget
from layerfold.core.report import markdown_table
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.heal import heal
from layerfold.heal.settings import LossWeights

FOLD = ("svd", {"allocation": "sensitivity", "whole": [0, -1]})
# The candidate mixes of each model kind (heal.losses.LOSSES); --quick (CI's smoke test): MiniLM, one mix, a few steps.
MIXES = {"all-MiniLM-L6-v2": ["cosine", "cosine=1,hidden=1", "hidden"], "SmolLM2-135M": ["kl", "kl=1,lm=0.5"]}


def tasks(quick: bool) -> list[Task]:
    """The development tasks (tasks.py), calibrated and healed on the model's own domain: MiniLM on STS-B train
    sentences, SmolLM2 on WikiText's first half without its dev text."""
    encoder = minilm_dev(one_domain=True, quick=quick).keeping("STS-B dev", "WikiText cosine")
    if quick:
        return [dataclasses.replace(encoder, heal=dataclasses.replace(encoder.heal, steps=4, eval_every=2))]
    return [encoder, smollm2_dev(one_domain=True).keeping("WikiText dev ppl", "Shakespeare dev ppl")]


def run(task: Task, mixes: list[str], work: Path) -> list[dict]:
    original = load_source(task.path, dtype=torch.float32)
    batches = calibration_batches(original, task.tokenizer, task.calibration, tokens=task.tokens)
    calibration = Calibration(original, batches, {"data": "dev heal text"})
    name, options = FOLD
    folded = registry.build(registry.get(name), copy.deepcopy(original), Budget(0.5, blocks_only=True), calibration,
                            **options)  # fmt: skip
    folded_dir = work / "folded"
    save(folded, folded_dir, source=task.path, overwrite=True)
    rows = [{"loss": "(original)", **task.figures(original, original)},
            {"loss": "(training-free fold)", **task.figures(folded, original)}]  # fmt: skip
    del folded
    for mix in tqdm(mixes, desc=f"{task.model} loss mixes", unit="mix"):
        config = dataclasses.replace(task.heal, loss=LossWeights.parse(mix))
        healed_dir = work / f"healed-{mix.replace('=', '').replace(',', '-')}"
        start = time.perf_counter()
        heal(folded_dir, task.path, task.heal_data, healed_dir, config, overwrite=True)
        seconds = time.perf_counter() - start
        rows.append({"loss": mix, **task.figures(load(healed_dir), original), "heal_seconds": round(seconds, 1)})
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
    args = bench_parser(__doc__).parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="layerfold-loss-") as tmp:
        for task in tasks(args.quick):
            mixes = MIXES[task.model][:1] if args.quick else MIXES[task.model]
            work = Path(tmp) / task.model
            work.mkdir()
            rows = run(task, mixes, work)
            config = task.heal
            window = f" × {config.seq_len} tokens" if config.seq_len else ""
            budget = f"{config.steps} steps × {config.batch}{window}"
            results.append({"model": task.model, "headline": task.metric, "higher_is_better": task.higher_is_better,
                            "budget": budget, "rows": rows,
                            **choice(rows, task.metric, task.higher_is_better)})  # fmt: skip
    payload = {"seconds": round(time.perf_counter() - start), "results": results}
    markdown = render(results)
    write_results("loss_mix", payload, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
