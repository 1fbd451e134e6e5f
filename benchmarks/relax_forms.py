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

import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, bench_parser, merge_models, write_results
from tasks import DEV_TASKS, Task
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.checkpoints.folded import load, load_source, save
from layerfold.core.budget import Budget
from layerfold.core.errors import LayerfoldError
from layerfold.core.report import markdown_table, parameter_breakdown
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.folding.in_memory import fold
from layerfold.heal import heal
from layerfold.methods.delta import adjacent_groups, pick_group
from layerfold.methods.planner import filling_rank, largest_rank, relaxation_size
from layerfold.operations.plan import FoldPlan

FORMS = ("lora", "mos", "vera", "svfit", "kronecker")
# MoS's claim (about 1/4 to 1/8 of LoRA's parameters at equal quality): these forms also at a quarter of what the
# lora row's relaxations store, on the same tie groups ("<form>-quarter" rows, smaller than the budget).
QUARTER = ("lora", "mos")
PEERS = (("svd", {"allocation": "sensitivity", "whole": [0, -1]}), ("basis", {"allocation": "sensitivity",
         "whole": [0, -1]}))  # fmt: skip
BUDGETS = (0.83, 0.67, 0.5)
QUICK_ROWS = ("lora", "svd")  # --quick (CI's smoke test): MiniLM at 50 %, a form and a peer


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


def run(task: Task, budgets, heal_rows: set[str], work: Path, only: tuple[str, ...] | None = None) -> list[dict]:
    original = load_source(task.path, dtype=torch.float32)
    batches = calibration_batches(original, task.tokenizer, task.calibration, tokens=task.tokens)
    calibration = Calibration(original, batches, {"data": task.calibration_text})
    statistics = calibration.statistics()
    blocks = parameter_breakdown(original)["blocks"]
    rows = [{"budget": 1.0, "row": "original", **task.figures(original, original)}]
    names = [f for f in [*FORMS, *(f"{q}-quarter" for q in QUARTER), *(n for n, _ in PEERS)] if not only or f in only]
    for keep, name in tqdm([(b, f) for b in budgets for f in names], desc=task.model, unit="fold"):
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
               "fold_s": round(seconds, 1), **task.figures(folded, original)}  # fmt: skip
        if name in heal_rows and keep == 0.5:
            folded_dir, healed_dir = work / f"{name}-{keep}", work / f"{name}-{keep}-healed"
            save(folded, folded_dir, source=task.path, overwrite=True)
            start = time.perf_counter()
            heal(folded_dir, task.path, task.heal_data, healed_dir, task.heal, overwrite=True)
            row["heal_s"] = round(time.perf_counter() - start, 1)
            row.update({f"healed {k}": v for k, v in task.figures(load(healed_dir), original).items()})
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

    old = [{**r, "rows": [{**dates(row, old_date), **row} for row in r["rows"]]} for r in old]
    results = merge_models(old, new, key=lambda row: (row["budget"], row["row"]), update=True,
                           stamp=lambda row: dates(row, date))  # fmt: skip
    order = [*FORMS, *(f"{q}-quarter" for q in QUARTER), *(n for n, _ in PEERS)]
    for result in results:
        result["rows"].sort(key=lambda r: (-r["budget"], order.index(r["row"]) if r["row"] in order else -1))
    return results


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
    parser = bench_parser(__doc__, models="minilm,smollm2; --quick: minilm")
    parser.add_argument("--budgets", default=None, help=f"comma-separated (default: {','.join(map(str, BUDGETS))}; "
                        "--quick: 0.5)")  # fmt: skip
    parser.add_argument("--heal", action="store_true", help="also heal the 50 %% folds")
    parser.add_argument("--heal-rows", default=",".join([*FORMS, *(n for n, _ in PEERS)]),
                        help="which rows --heal heals (comma-separated)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of results/relax_forms.json that this "
                        "run does not measure again (by model, budget and row)")  # fmt: skip
    args = parser.parse_args()
    models = (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(",")
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else [0.5] if args.quick else BUDGETS
    torch.manual_seed(0)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="layerfold-forms-") as tmp:
        for key in models:
            task = DEV_TASKS[key](quick=args.quick)
            healed = set(args.heal_rows.split(",")) if args.heal else set()
            rows = run(task, budgets, healed, Path(tmp), QUICK_ROWS if args.quick else None)
            results.append({"model": task.model, "calibration": task.calibration_text, "tokens": task.tokens,
                            "rows": rows})  # fmt: skip
    seconds = round(time.perf_counter() - started)
    if args.merge and (RESULTS / "relax_forms.json").exists():
        old = json.loads((RESULTS / "relax_forms.json").read_text())
        results = merged(old["results"], results, time.strftime("%Y-%m-%d"), old["date"][:10])
        seconds += old.get("seconds", 0)
    markdown = render(results)
    write_results("relax_forms", {"seconds": seconds, "results": results}, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
