"""The planner's choice ("auto") at every budget of the sweep, on the real models, next to the best fixed strategy.

    python benchmarks/auto.py                  # make bench (after sweep.py and heal.py)
    python benchmarks/auto.py --quick          # MiniLM, one budget, few gate steps (make bench-quick)

For each model the original is analysed once (Block Influence, layer/weight/gradient similarity, gates) on the
calibration data of the sweep, then the planner searches every budget and the chosen fold is measured with the
sweep's metric: STS-B test Spearman (MiniLM) or WikiText-2 perplexity on the second half of the test file
(SmolLM2; calibration on the first half). The best fixed strategy of each budget comes from
results/latest.json (the sweep), both among all its rows and among the rows that keep no more parameters than
the budget (whole-block rows round the block count and may keep slightly more; the planner never does). At 50 %
of the block parameters the auto fold is also healed with heal.py's budget and compared with results/heal.json.
Writes results/auto.{json,md} (--quick: results/quick/).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, bench_parser, ratios_to, runtime_cells, runtime_columns, runtime_of, write_results
from heal import heal_task
from tasks import TEST_TASKS, Task, minilm, smollm2
from tqdm.auto import tqdm

from layerfold.checkpoints.folded import load, save
from layerfold.core.budget import Budget, kept_fractions
from layerfold.core.report import markdown_table, parameter_breakdown
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.evaluation.metrics import runtime_cost
from layerfold.heal import heal
from layerfold.jobs.compress import plan_for_budget, planning_analysis, prepare
from layerfold.methods.planner import Proxy

BLOCK_BUDGETS = (0.83, 0.67, 0.5)
TOTAL_BUDGETS = {"all-MiniLM-L6-v2": (), "SmolLM2-135M": (0.9, 0.84, 0.75, 0.65)}


def label(budget: Budget) -> str:
    return f"{budget.keep:.0%} of {'blocks' if budget.blocks_only else 'all'}"


def task(name: str, quick: bool) -> Task:
    """The planner's task: the sweep's model and mix of domains (so that auto and the fixed rows see the same
    kinds of text), every STS-B test pair (the rows are compared with the sweep's, measured on all of them;
    --quick, a smoke test, on 300); SmolLM2's search fits on 8 windows and holds 2 out for the proxy (the 5-minute planner
    target), and the chosen plan is then fitted on the sweep's 65,536 tokens."""
    if name == "minilm":
        return minilm(quick, all_pairs=not quick)
    return smollm2(quick, eval_tokens=4096, tokens=10240, windows=", 1,024-token windows")


def best_fixed(sweep_rows: list[dict], model: str, budget: Budget, higher: bool, within: bool) -> dict | None:
    counts = "blocks" if budget.blocks_only else "all"
    key = "keep_blocks" if budget.blocks_only else "keep"
    rows = [
        r
        for r in sweep_rows
        if r["model"] == model
        and r["budget"] == {"fraction": budget.keep, "counts": counts}
        and r.get("value") is not None
        and (not within or r[key] <= budget.keep + 1e-9)
    ]
    if not rows:
        return None
    return (max if higher else min)(rows, key=lambda r: r["value"])


def run_model(
    name: str, quick: bool, work: Path, sweep_rows: list[dict], heal_rows: dict, only: list[Budget] | None = None
) -> dict:
    """The planner's rows of one model: analyse once, then search, measure (and at 50 % of the blocks heal) each
    budget beside the best fixed rows. Over 80 lines: one row's steps in order, each a call into layerfold."""
    t = task(name, quick)
    started = time.perf_counter()
    prepared = prepare(t.path, t.calibration, tokens=t.tokens)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    analysis = planning_analysis(prepared, gate_steps=10 if quick else 20)
    analysis_seconds = time.perf_counter() - started
    proxy = Proxy(prepared.model, prepared.proxy_batches)
    # The chosen plan is fitted again on the sweep's own calibration data, so that auto and the fixed rows differ
    # only in the plan: the same batches, the same tokens.
    started = time.perf_counter()
    sweep_task = TEST_TASKS[name](quick)
    sweep_batches = calibration_batches(
        prepared.model, prepared.tokenizer, sweep_task.calibration, tokens=sweep_task.tokens
    )
    refit = Calibration(prepared.model, sweep_batches, {"data": sweep_task.calibration_text})
    refit.statistics()
    refit_seconds = time.perf_counter() - started
    original = parameter_breakdown(prepared.model)
    budgets = [Budget(b, blocks_only=True) for b in ((0.5,) if quick else BLOCK_BUDGETS)]
    budgets += [Budget(b) for b in (() if quick else TOTAL_BUDGETS[t.model])]
    if only is not None:
        budgets = [b for b in budgets if b in only]
    rows = []
    # The original's run-time cost, measured in this run: each auto row's ratios are to it.
    original_runtime = runtime_cost(t.path, quick=quick, **sweep_task.runtime_inputs)
    for budget in tqdm(budgets, desc=f"{t.model} auto", unit="budget"):
        _, result = plan_for_budget(prepared, budget, analysis=analysis, proxy=proxy, refit=refit)
        search_seconds = result.seconds
        folded = result.best_model
        value = t.value(folded)
        runtime = runtime_of(folded, t.path, quick=quick, **sweep_task.runtime_inputs)
        runtime["ratios"] = ratios_to(runtime, original_runtime)
        fixed = best_fixed(sweep_rows, t.model, budget, t.higher_is_better, within=False)
        fixed_within = best_fixed(sweep_rows, t.model, budget, t.higher_is_better, within=True)
        row = {
            "model": t.model,
            "budget": label(budget),
            "choice": result.best.name,
            "plan_summary": result.best.plan.describe(),
            **kept_fractions(original, parameter_breakdown(folded)),
            "value": value,
            "proxy": result.best.proxy,
            "runner_up": result.candidates[1].name if len(result.candidates) > 1 else None,
            "candidates": [c.to_dict() for c in result.candidates],
            "refit_tokens": result.refit_tokens,
            "refit_seconds": result.refit_seconds,
            "search_seconds": round(search_seconds, 1),
            "runtime": runtime,
            "planner_seconds": round(analysis_seconds + search_seconds, 1),
            "best_fixed": None
            if fixed is None
            else {
                "method": fixed["method"],
                "options": fixed["options"],
                "value": fixed["value"],
                "keep": fixed["keep"],
                "keep_blocks": fixed["keep_blocks"],
            },
            "best_fixed_within": None
            if fixed_within is None
            else {"method": fixed_within["method"], "options": fixed_within["options"], "value": fixed_within["value"]},
        }
        if budget.blocks_only and budget.keep == 0.5:
            healing = heal_task(name, quick)
            folded_dir, healed_dir = work / f"{name}-auto", work / f"{name}-auto-healed"
            save(folded, folded_dir, source=t.path, overwrite=True)
            report = heal(folded_dir, t.path, healing.heal_data, healed_dir, healing.heal, overwrite=True)
            row["healed"] = t.value(load(healed_dir))
            row["heal_seconds"] = round(report["seconds_this_run"], 1)
            row["heal_tokens"] = report["tokens_this_run"]
            healed_fixed = [r for r in heal_rows.get(t.model, {}).get("rows", []) if r.get("healed") is not None]
            if healed_fixed:
                best = (max if t.higher_is_better else min)(healed_fixed, key=lambda r: r["healed"])
                row["best_fixed_healed"] = {
                    "method": best["method"],
                    "options": best["options"],
                    "value": best["healed"],
                }
        tqdm.write(json.dumps({k: v for k, v in row.items() if k != "candidates"}, default=str))
        rows.append(row)
        del folded, result
    return {
        "metric": t.metric,
        "higher_is_better": t.higher_is_better,
        "calibration": {**prepared.calibration.settings, "data": t.calibration_text, "proxy_tokens": proxy.tokens},
        "refit": {**refit.settings, "seconds": round(refit_seconds, 1)},
        "load_seconds": round(load_seconds, 1),
        "analysis_seconds": round(analysis_seconds, 1),
        "analysis_parts": analysis.seconds,
        "original_runtime": original_runtime,
        "rows": rows,
    }


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(payload: dict) -> str:
    parts = [
        f"# auto: the planner's choice at every budget ({payload['date']})",
        "",
        "The planner analyses the original once, then at each budget folds every candidate it is allowed "
        "(drop, tie, basis, lora), scores them by a proxy on held-out calibration text and keeps the best. "
        "'best fixed' is the best row of the sweep (results/latest.md) at that budget; 'within' only counts "
        "sweep rows that keep no more parameters than the budget (whole-block rows round up). Healed: the same "
        "budget as results/heal.md. Planner seconds = analysis + search for that budget. The search fits the "
        "candidates on a part of the calibration text; the chosen plan, if it whitens, is then fitted again on the "
        "sweep's own calibration batches (fit s), so that auto and the fixed rows differ only in the plan.",
        "",
    ]
    for model, info in payload["models"].items():
        arrow = "higher is better" if info["higher_is_better"] else "lower is better"
        parts += [
            f"## {model} — {info['metric']} ({arrow})",
            "",
            f"Calibration: {info['calibration']['data']}, {info['calibration']['tokens']} tokens "
            f"({info['calibration']['proxy_tokens']} more held out for the proxy). Analysis: "
            f"{info['analysis_seconds']:.0f} s ({', '.join(f'{k} {v:g}' for k, v in info['analysis_parts'].items())})."
            + (
                f" Final fit: the sweep's {info['refit']['tokens']} tokens in {info['refit']['batches']} batches "
                f"(statistics {info['refit']['seconds']:.0f} s, once)."
                if info.get("refit")
                else ""
            ),
            "",
        ]
        if info.get("original_runtime"):
            original = {"runtime": info["original_runtime"]}
            columns = runtime_columns([original])
            shown = ", ".join(f"{label.replace(' (× orig.)', '')} {cell}" for (_, label), cell in
                              zip(columns, runtime_cells(original, columns)))  # fmt: skip
            parts += [f"The original, measured in this run: {shown}.", ""]
        body = []
        columns = runtime_columns(info["rows"])
        for r in info["rows"]:
            fixed, within = r["best_fixed"], r["best_fixed_within"]
            body.append(
                [
                    r["budget"],
                    r["choice"],
                    f"{r['keep_blocks']:.1%} / {r['keep']:.1%}",
                    fmt(r["value"]),
                    f"{fixed['method']} {fmt(fixed['value'])}" if fixed else "–",
                    f"{within['method']} {fmt(within['value'])}" if within else "–",
                    fmt(r.get("healed")),
                    f"{r['best_fixed_healed']['method']} {fmt(r['best_fixed_healed']['value'])}"
                    if r.get("best_fixed_healed")
                    else "–",
                    f"{r['planner_seconds']:.0f}",
                    f"{r['refit_seconds']:.0f}" if r.get("refit_seconds") is not None else "–",
                    *runtime_cells(r, columns),
                ]
            )
        parts += [
            markdown_table(
                [
                    "budget",
                    "auto choice",
                    "kept (blocks / all)",
                    "auto",
                    "best fixed",
                    "best fixed within",
                    "auto healed",
                    "best fixed healed",
                    "planner s",
                    "fit s",
                    *(label for _, label in columns),
                ],
                body,
            ),
            "",
        ]
    return "\n".join(parts)


def main() -> None:
    parser = bench_parser(__doc__, models="minilm,smollm2; --quick: minilm")
    parser.add_argument(
        "--budgets", default=None, help="comma-separated subset, e.g. 0.5b,0.84 (b: of the blocks; else of all)"
    )
    args = parser.parse_args()
    names = (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(",")
    torch.manual_seed(0)
    sweep = json.loads((RESULTS / "latest.json").read_text())["rows"] if (RESULTS / "latest.json").is_file() else []
    heal_rows = json.loads((RESULTS / "heal.json").read_text())["models"] if (RESULTS / "heal.json").is_file() else {}
    start = time.perf_counter()
    payload = {"quick": args.quick, "models": {}}
    out_file = RESULTS / "auto.json"
    if not args.quick and out_file.is_file():
        payload["models"] = json.loads(out_file.read_text()).get("models", {})  # keep the models not re-run
    with tempfile.TemporaryDirectory(prefix="layerfold-auto-") as tmp:
        for name in names:
            only = None
            if args.budgets:
                only = [
                    Budget(float(b[:-1]), blocks_only=True) if b.endswith("b") else Budget(float(b))
                    for b in args.budgets.split(",")
                ]
            info = run_model(name, args.quick, Path(tmp), sweep, heal_rows, only)
            payload["models"][info["rows"][0]["model"]] = info
    payload["seconds"] = round(time.perf_counter() - start)
    payload["date"] = time.strftime("%Y-%m-%d")
    markdown = render(payload)
    write_results("auto", payload, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
