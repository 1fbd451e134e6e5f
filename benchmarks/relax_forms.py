"""Tie relaxation forms side by side (issue 19): the same tie groups, each form's rank filling the same budget.

    python benchmarks/relax_forms.py                     # make bench: both models, 83 / 67 / 50 % of the blocks
    python benchmarks/relax_forms.py --models minilm --budgets 0.5 --heal

At each budget of the block parameters, every layer is tied in runs of adjacent layers (the run length of the
``delta`` method: the smallest that leaves a third of the kept projection parameters to the relaxations),
shared weights fitted by least squares, and each relaxation form gets the largest rank that keeps the fold
within the budget (``planner.filling_rank``; VeRA stops at the matrices' larger side, so its rows are smaller):

- ``lora``: a private LoRA per layer (the ``delta`` method's fold, DeltaLLM);
- ``mos``: two pools of vectors each group shares (rows for A, columns for B); each layer reads r of each by its
  index maps (by default the whole pool) through its own r × r core;
- ``vera``: frozen random bases made from a seed, two vectors per layer;
- ``svfit``: a fixed SVD per layer whose singular values train;
- ``kronecker``: Compacter's sums of Kronecker products, four 4 × 4 slow matrices each group shares and each
  layer's fast factors at that rank (the cost of a LoRA of the same rank), fitted to each layer's outputs.

Beside them, per-layer whitened svd and basis (sensitivity ranks, ends whole) at the same budget. Every fit is
whitened by the calibration inputs (all-MiniLM-L6-v2: STS-B train sentences + pydoc paragraphs; SmolLM2: the
first half of WikiText-2 test without its last 30,000 characters + pydoc). Figures: STS-B dev and test
Spearman and cosine to the original on WikiText paragraphs (MiniLM); perplexity on the 30,000 dev characters,
on the last 4,096 tokens of Tiny Shakespeare's first half (both development data) and, reported only, on the
first 4,096 tokens of WikiText-2 test's second half (SmolLM2). ``--heal``: each fold at 50 % is also healed
end to end with the budget of the other healed rows (benchmarks/heal.py): MiniLM 150 steps × 64 STS-B train
sentences (with the pydoc mix as heal data a step took 10 s here instead of 1.8 s); SmolLM2 24 steps × 4 × 512
tokens of the calibration mix; all parameters.
Writes benchmarks/results/relax_forms.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, calibration_data, smollm2_dir, write_results, written_text
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.core.budget import Budget
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.core.texts import read_sts, text_lines, wikitext_half
from layerfold.jobs.demo import default_model_path
from layerfold.core.errors import LayerfoldError
from layerfold.evaluation.metrics import embedding_fidelity, perplexity, sentence_embeddings, sts_spearman
from layerfold.folding.in_memory import fold
from layerfold.heal import HealConfig, heal
from layerfold.checkpoints.folded import load, load_source, load_tokenizer, save
from layerfold.methods.delta import adjacent_groups, pick_group
from layerfold.methods.planner import filling_rank, largest_rank, relaxation_size
from layerfold.operations.plan import FoldPlan
from layerfold.core.report import markdown_table, parameter_breakdown

FORMS = ("lora", "mos", "vera", "svfit", "kronecker")
# MoS's claim (about 1/4 to 1/8 of LoRA's parameters at equal quality): these forms also at a quarter of what the
# lora row's relaxations store, on the same tie groups ("<form>-quarter" rows, smaller than the budget).
QUARTER = ("lora", "mos")
PEERS = (("svd", {"allocation": "sensitivity", "whole": [0, -1]}), ("basis", {"allocation": "sensitivity",
         "whole": [0, -1]}))  # fmt: skip
BUDGETS = (0.83, 0.67, 0.5)
DEV_CHARS = 30_000
DEV_TOKENS = 4096


def minilm() -> dict:
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    dev = read_sts(DATA / "stsbenchmark" / "sts-dev.csv")
    test = read_sts(DATA / "stsbenchmark" / "sts-test.csv")
    wikitext = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    paragraphs = [line for line in text_lines(wikitext) if len(line.split()) >= 8][-256:]
    source, what = calibration_data(DATA / "stsbenchmark" / "sts-train.csv", "STS-B train sentences", one_domain=False)
    reference: list[torch.Tensor] = []

    def measure(model, original) -> dict:
        if not reference:
            reference.append(sentence_embeddings(original, tokenizer, paragraphs))
        cosine = embedding_fidelity(reference[0], sentence_embeddings(model, tokenizer, paragraphs))["mean"]
        return {"STS-B dev": sts_spearman(model, tokenizer, dev)["value"],
                "STS-B test": sts_spearman(model, tokenizer, test)["value"], "WikiText cosine": cosine}  # fmt: skip

    return {"model": "all-MiniLM-L6-v2", "path": path, "calibration": source, "what": what, "tokens": 32768,
            "measure": measure, "heal": HealConfig(steps=150, batch=64, lr=2e-4, eval_every=50, seed=0, stage="e2e"),
            "heal_data": DATA / "stsbenchmark" / "sts-train.csv"}  # fmt: skip


def smollm2() -> dict:
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    first = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first")
    own = written_text("wikitext-first-half-without-dev.txt", first[:-DEV_CHARS])
    source, what = calibration_data(own, "WikiText-2 test, first half without its last 30,000 characters",
                                    one_domain=False)  # fmt: skip
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    shakespeare = shakespeare[: len(shakespeare) // 2]
    second = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "second")
    ids = {"WikiText dev ppl": tokenizer(first[-DEV_CHARS:], return_tensors="pt").input_ids[0][:DEV_TOKENS],
           "Shakespeare dev ppl": tokenizer(shakespeare, return_tensors="pt").input_ids[0][-DEV_TOKENS:],
           "WikiText test ppl": tokenizer(second, return_tensors="pt").input_ids[0][:DEV_TOKENS]}  # fmt: skip

    def measure(model, original) -> dict:
        return {name: perplexity(model, x, max_length=1024, stride=1024)["value"] for name, x in ids.items()}

    return {"model": "SmolLM2-135M", "path": path, "calibration": source, "what": what, "tokens": 32768,
            "measure": measure, "heal_data": source,
            "heal": HealConfig(steps=24, batch=4, seq_len=512, lr=1e-4, eval_every=12, seed=0, stage="e2e")}  # fmt: skip


MODELS = {"minilm": minilm, "smollm2": smollm2}


def form_plan(model, budget: Budget, relax: str, statistics) -> FoldPlan:
    """Adjacent runs (delta's length), least squares, whitened, ``relax`` at the rank that fills ``budget``."""
    layers = registry.num_layers(model)
    size = pick_group(model, budget, "all")
    plan = FoldPlan.from_groups(adjacent_groups(layers, size), num_layers=layers, fit="lstsq", whiten=True,
                                relax=relax, rank=1, provenance={"benchmark": "relax_forms", "group": size})  # fmt: skip
    allowed = budget.counted(model) - budget.reduction(model)
    rank = filling_rank(model, plan, statistics, allowed, "blocks")
    if rank < 1:
        raise LayerfoldError(f"no room for a {relax} relaxation of rank 1")
    for op in plan.ties():
        op.rank = rank
    return plan


def quarter_plan(model, budget: Budget, relax: str, statistics) -> FoldPlan:
    """The lora row's tie groups with ``relax`` at the largest rank whose relaxations store at most a quarter
    of the lora row's."""
    plan = copy.deepcopy(form_plan(model, budget, "lora", statistics))
    target = relaxation_size(model, plan) / 4
    for op in plan.ties():
        op.relax = relax
    rank = largest_rank(model, plan, target)
    if rank < 1:
        raise LayerfoldError(f"no room for a {relax} relaxation of rank 1 in a quarter of lora's")
    for op in plan.ties():
        op.rank = rank
    return plan


def run(task: dict, budgets, heal_rows: set[str], work: Path) -> list[dict]:
    original = load_source(task["path"], dtype=torch.float32)
    tokenizer = load_tokenizer(task["path"])
    batches = calibration_batches(original, tokenizer, task["calibration"], tokens=task["tokens"])
    calibration = Calibration(original, batches, {"data": task["what"]})
    statistics = calibration.statistics()
    blocks = parameter_breakdown(original)["blocks"]
    rows = [{"budget": 1.0, "row": "original", **task["measure"](original, original)}]
    jobs = [(b, f) for b in budgets for f in [*FORMS, *(f"{q}-quarter" for q in QUARTER), *(n for n, _ in PEERS)]]
    for keep, name in tqdm(jobs, desc=task["model"], unit="fold"):
        budget = Budget(keep, blocks_only=True)
        start = time.perf_counter()
        try:
            if name in FORMS or name.endswith("-quarter"):
                form = name.removesuffix("-quarter")
                plan = (form_plan if form == name else quarter_plan)(original, budget, form, statistics)
                folded = fold(copy.deepcopy(original), plan, calibration=statistics, progress=False)
                detail = (f"runs of {plan.provenance['group']}, rank {plan.ties()[0].rank}, relaxations "
                          f"{relaxation_size(original, plan) / 1e6:.2f} M")  # fmt: skip
            else:
                options = dict(PEERS)[name]
                folded = registry.build(registry.get(name), copy.deepcopy(original), budget, calibration, **options)
                detail = "sensitivity ranks, ends whole"
        except LayerfoldError as err:
            rows.append({"budget": keep, "row": name, "detail": str(err)})
            tqdm.write(str(rows[-1]))
            continue
        seconds = time.perf_counter() - start
        row = {"budget": keep, "row": name, "detail": detail, "kept": parameter_breakdown(folded)["blocks"] / blocks,
               "fold_s": round(seconds, 1), **task["measure"](folded, original)}  # fmt: skip
        if name in heal_rows and task["heal"] is not None and keep == 0.5:
            folded_dir, healed_dir = work / f"{name}-{keep}", work / f"{name}-{keep}-healed"
            save(folded, folded_dir, source=task["path"], overwrite=True)
            start = time.perf_counter()
            heal(folded_dir, task["path"], task["heal_data"], healed_dir, task["heal"], overwrite=True)
            row["heal_s"] = round(time.perf_counter() - start, 1)
            row.update({f"healed {k}": v for k, v in task["measure"](load(healed_dir), original).items()})
        rows.append(row)
        tqdm.write(str(row))
        del folded
    return rows


def merged(old: list[dict], new: list[dict], date: str, old_date: str) -> list[dict]:
    """``new``'s rows over ``old``'s, by model, budget and row: a re-run row's figures replace the old ones, and
    the old row's other figures (its healed columns, when only the training-free fold was run again) stay, with
    the date each part was measured (``measured``, ``healed on``)."""

    def dates(row: dict, date: str) -> dict:
        healed = any(k.startswith("healed ") for k in row)
        return {"measured": date, **({"healed on": date} if healed else {})}

    results = {r["model"]: {**r, "rows": [{**dates(row, old_date), **row} for row in r["rows"]]} for r in old}
    for result in new:
        target = results.setdefault(result["model"], {**result, "rows": []})
        target.update({k: v for k, v in result.items() if k != "rows"})
        index = {(row["budget"], row["row"]): row for row in target["rows"]}
        for row in result["rows"]:
            row = {**row, **dates(row, date)}
            if (row["budget"], row["row"]) in index:
                index[row["budget"], row["row"]].update(row)
            else:
                target["rows"].append(row)
                index[row["budget"], row["row"]] = row
        order = [*FORMS, *(f"{q}-quarter" for q in QUARTER), *(n for n, _ in PEERS)]
        target["rows"].sort(key=lambda r: (-r["budget"], order.index(r["row"]) if r["row"] in order else -1))
    return list(results.values())


def render(results: list[dict]) -> str:
    parts = ["# Tie relaxation forms at equal budgets", "", __doc__.split("\n\n")[2], ""]
    for result in results:
        dates = ("measured", "healed on")  # last: they say when each part of a merged row was measured
        columns = list(dict.fromkeys(k for r in result["rows"] for k in r if k not in ("budget", "row", *dates)))
        columns += [d for d in dates if any(d in r for r in result["rows"])]
        body = [[f"{r['budget']:.0%}", r["row"], *(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                 for c in columns)] for r in result["rows"]]  # fmt: skip
        parts += [f"## {result['model']} (calibration: {result['calibration']}, {result['tokens']:,} tokens)", "",
                  markdown_table(["blocks kept", "row", *columns], body), ""]  # fmt: skip
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--heal", action="store_true", help="also heal the 50 %% folds")
    parser.add_argument("--heal-rows", default=",".join([*FORMS, *(n for n, _ in PEERS)]),
                        help="which rows --heal heals (comma-separated)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of results/relax_forms.json that this "
                        "run does not measure again (by model, budget and row)")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="layerfold-forms-") as tmp:
        for key in args.models.split(","):
            task = MODELS[key]()
            healed = set(args.heal_rows.split(",")) if args.heal else set()
            rows = run(task, [float(b) for b in args.budgets.split(",")], healed, Path(tmp))
            results.append({"model": task["model"], "calibration": task["what"], "tokens": task["tokens"],
                            "rows": rows})  # fmt: skip
    seconds = round(time.perf_counter() - started)
    if args.merge and (RESULTS / "relax_forms.json").exists():
        old = json.loads((RESULTS / "relax_forms.json").read_text())
        results = merged(old["results"], results, time.strftime("%Y-%m-%d"), old["date"][:10])
        seconds += old.get("seconds", 0)
    markdown = render(results)
    write_results("relax_forms", {"seconds": seconds, "results": results}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
