"""The side-by-side benchmark: every registered method at several budgets on the real models.

    python benchmarks/sweep.py            # full sweep  (make bench)
    python benchmarks/sweep.py --quick    # smoke test  (make bench-quick)

Encoder: all-MiniLM-L6-v2, STS-B test Spearman × 100, calibrated on STS-B train sentences. Decoder:
SmolLM2-135M, perplexity on the second half of the WikiText-2 test file, calibrated on the first half (kept for
calibration and healing; the two never meet). Budgets: "N% of blocks" keeps that fraction of the
transformer-block parameters (whole-block methods get round(N × layers) unique blocks; tying adds its
relaxations on top); "N% of all" keeps that fraction of all unique parameters, embeddings included. The real
fractions are in every row. Calibration runs once per model and is shared by every row. Writes
benchmarks/results/latest.{json,md}, pareto.png and dated copies (--quick: benchmarks/results/quick/).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from common import DATA, RESULTS, machine, smollm2_dir
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.budget import Budget, kept_fractions
from layerfold.calibrate import Calibration, calibration_batches
from layerfold.data import read_sts, wikitext_half
from layerfold.demo import default_model_path
from layerfold.errors import LayerfoldError
from layerfold.evaluate import perplexity, sts_spearman, tokenize_text
from layerfold.io import load_source, load_tokenizer
from layerfold.report import markdown_table, parameter_breakdown

BLOCK_BUDGETS = (1.0, 0.83, 0.67, 0.5)
QUICK_BLOCK_BUDGETS = (1.0, 0.5)
# Budgets counted over all unique parameters (embeddings included), for the methods that take any budget.
TOTAL_BUDGETS = (0.9, 0.84, 0.75, 0.65)
QUICK_TOTAL_BUDGETS = (0.84,)
ANY_BUDGET = ("drop-even", "basis", "svd", "shortgpt", "laco")


@dataclass
class Task:
    model: str
    path: Path
    metric: str
    cap: str
    measure: Callable[[torch.nn.Module], float]
    calibration_source: list[str]
    calibration_tokens: int
    calibration_text: str
    total_budgets: tuple[float, ...]
    block_methods: tuple[str, ...] | None = None  # methods run at the block budgets (None: all)


def minilm_task(quick: bool) -> Task:
    path = default_model_path()
    pairs = read_sts(DATA / "stsbenchmark" / "sts-test.csv", limit=300 if quick else None)
    tokenizer = load_tokenizer(path)
    train = [s for p in read_sts(DATA / "stsbenchmark" / "sts-train.csv") for s in (p.first, p.second)]
    return Task(
        "all-MiniLM-L6-v2",
        path,
        "spearman",
        f"STS-B test, {len(pairs)} pairs",
        lambda model: sts_spearman(model, tokenizer, pairs)["value"],
        train,
        8192 if quick else 32768,
        "STS-B train sentences",
        (),
    )


def smollm2_task(quick: bool) -> Task:
    path = smollm2_dir()
    tokens = 2048 if quick else 4096
    wikitext = DATA / "wikitext-2-raw" / "wiki.test.raw"
    ids = tokenize_text(load_tokenizer(path), wikitext_half(wikitext, "second"), tokens)
    return Task(
        "SmolLM2-135M",
        path,
        "perplexity",
        f"WikiText-2 test, second half (cut at the middle character), first {ids.numel()} tokens, "
        "non-overlapping 1,024-token windows",
        lambda model: perplexity(model, ids, max_length=1024, stride=1024)["value"],
        [wikitext_half(wikitext, "first")],
        8192 if quick else 65536,
        "WikiText-2 test, first half, 2,048-token windows",
        QUICK_TOTAL_BUDGETS if quick else TOTAL_BUDGETS,
        # The training-free methods of issue 5 run at the "of all" budgets here (the time limit of make bench).
        ("original", "drop-first", "drop-even", "tie-cycle", "tie-sequence"),
    )


TASKS = {"minilm": minilm_task, "smollm2": smollm2_task}


def jobs_for(task: Task, quick: bool) -> list[tuple[registry.Method, Budget, dict]]:
    budgets = [Budget(b, blocks_only=True) for b in (QUICK_BLOCK_BUDGETS if quick else BLOCK_BUDGETS)]
    budgets += [Budget(b) for b in task.total_budgets]
    jobs = []
    for budget in budgets:
        for method in registry.REGISTRY.values():
            if (method.name == "original") != (budget.keep == 1.0):
                continue
            if not budget.blocks_only and method.name not in ANY_BUDGET:
                continue
            if budget.blocks_only and task.block_methods is not None and method.name not in task.block_methods:
                continue
            for options in method.variants(quick):
                jobs.append((method, budget, options))
    return jobs


def sweep(task_name: str, quick: bool) -> tuple[list[dict], str, dict]:
    task = TASKS[task_name](quick)
    original = load_source(task.path)
    base = parameter_breakdown(original)
    start = time.perf_counter()
    batches = calibration_batches(
        original, load_tokenizer(task.path), task.calibration_source, tokens=task.calibration_tokens
    )
    calibration = Calibration(original, batches, {"data": task.calibration_text})
    calibration.statistics()  # once, before any row, so that rows' seconds exclude it
    calibration_info = {**calibration.settings, "seconds": round(time.perf_counter() - start, 1)}
    rows = []
    for method, budget, options in tqdm(jobs_for(task, quick), desc=task.model, unit="run"):
        start = time.perf_counter()
        row = {
            "model": task.model,
            "method": method.name,
            "options": dict(options),
            "budget": budget.to_dict(),
            "healed": False,
            "metric": task.metric,
        }
        try:
            model = registry.build(method, copy.deepcopy(original), budget, calibration, **options)
        except LayerfoldError as err:  # e.g. LaCo finds no merge above its threshold: an honest empty row
            rows.append(
                {
                    **row,
                    "keep": None,
                    "keep_blocks": None,
                    "unique_params": None,
                    "value": None,
                    "error": str(err),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            tqdm.write(json.dumps(rows[-1]))
            continue
        params = parameter_breakdown(model)
        with torch.no_grad():
            value = task.measure(model)
        rows.append(
            {
                **row,
                **kept_fractions(base, params),
                "unique_params": params["total"],
                "value": value,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        if method.name.startswith(("tie-", "drop-")):
            rows[-1]["options"]["unique_blocks"] = registry.unique_blocks_for(original, budget)
        tqdm.write(json.dumps(rows[-1]))
        del model
    return rows, task.cap, calibration_info


def budget_label(row: dict) -> str:
    return f"{row['budget']['fraction']:.0%} of {'blocks' if row['budget']['counts'] == 'blocks' else 'all'}"


def budget_order(row: dict) -> tuple:
    return (row["budget"]["counts"] != "blocks", -row["budget"]["fraction"])


def options_text(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["options"].items() if k != "unique_blocks") or "-"


def table(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (budget_order(r), r["method"], str(r["options"]))):
        if r["value"] is None:
            body.append(
                [
                    r["method"],
                    options_text(r),
                    budget_label(r),
                    "-",
                    "-",
                    "-",
                    "-",
                    f"failed: {r['error']}",
                    f"{r['seconds']:.0f}",
                ]
            )
            continue
        body.append(
            [
                r["method"],
                options_text(r),
                budget_label(r),
                r["options"].get("unique_blocks", "-"),
                f"{r['keep_blocks']:.1%}",
                f"{r['keep']:.1%}",
                f"{r['unique_params'] / 1e6:.2f}M",
                f"{r['value']:.2f}",
                f"{r['seconds']:.0f}",
            ]
        )
    metric = rows[0]["metric"]
    return markdown_table(
        [
            "method",
            "options",
            "budget",
            "unique blocks",
            "block params kept",
            "params kept",
            "unique params",
            metric,
            "seconds",
        ],
        body,
    )


def summary(rows: list[dict]) -> str:
    """The best option set of each method at each budget, one table for all models."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["value"] is None:
            continue
        key = (r["model"], budget_label(r), r["method"])
        if key not in best:
            best[key] = r
        elif (r["value"] < best[key]["value"]) == (r["metric"] == "perplexity"):
            best[key] = r
    body = []
    for (model, label, method), r in sorted(
        best.items(), key=lambda item: (item[0][0], budget_order(item[1]), item[0][2])
    ):
        body.append(
            [
                model,
                label,
                method,
                options_text(r),
                f"{r['keep_blocks']:.1%}",
                f"{r['keep']:.1%}",
                f"{r['metric']} {r['value']:.4g}",
            ]
        )
    return markdown_table(
        ["model", "budget", "method", "best options", "block params kept", "params kept", "quality"], body
    )


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["value"] is not None]
        lower_is_better = mine[0]["metric"] == "perplexity"
        for method in sorted({r["method"] for r in mine}):
            points = [r for r in mine if r["method"] == method]
            ax.scatter(
                [r["unique_params"] / 1e6 for r in points], [r["value"] for r in points], label=method, s=28, alpha=0.8
            )
        # Pareto front: no other row is both smaller and better.
        front, best = [], None
        for r in sorted(mine, key=lambda r: (r["unique_params"], r["value"] if lower_is_better else -r["value"])):
            if best is None or (r["value"] < best if lower_is_better else r["value"] > best):
                front.append(r)
                best = r["value"]
        ax.plot(
            [r["unique_params"] / 1e6 for r in front], [r["value"] for r in front], "k--", lw=1, label="Pareto front"
        )
        ax.set_xlabel("unique parameters (M)")
        ax.set_ylabel(
            mine[0]["metric"] + (" (log scale, lower is better)" if lower_is_better else " (higher is better)")
        )
        if lower_is_better:
            ax.set_yscale("log")
        ax.set_title(f"{model}: quality against size (training-free)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(payload: dict, out: Path) -> str:
    """Write the Markdown table and the chart for a results payload; return the Markdown."""
    rows, info = payload["rows"], payload["machine"]
    stamp = datetime.datetime.fromisoformat(payload["date"])
    sections = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        calibration = payload["calibration"][model]
        sections.append(
            f"## {model}: {mine[0]['metric']} ({payload['caps'][model]})\n\n"
            f"Calibration: {calibration['data']}, {calibration['tokens']:,} tokens in {calibration['batches']} "
            f"batches, {calibration['seconds']:.0f} s (once, shared by every row).\n\n{table(mine)}"
        )
    markdown = "\n\n".join(
        [
            f"# layerfold benchmark ({'quick' if payload['quick'] else 'full'}), {stamp:%Y-%m-%d}",
            f"Machine: {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
            f"{info['platform']}. Total {payload['seconds']} s. Training-free rows only (no healing yet).",
            f"Budgets: {payload['budgets']}.",
            "## Best options of each method at each budget\n\n" + summary(rows),
            *sections,
            "![quality against unique parameters](pareto.png)",
        ]
    )
    for name in ("latest", f"latest-{stamp:%Y-%m-%d}"):
        (out / f"{name}.md").write_text(markdown + "\n")
    for name in ("pareto", f"pareto-{stamp:%Y-%m-%d}"):
        chart(rows, out / f"{name}.png")
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rows and small caps (a smoke test)")
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--render", action="store_true", help="only redraw table and chart from latest.json")
    args = parser.parse_args()
    out = RESULTS / "quick" if args.quick else RESULTS
    if args.render:
        print(render(json.loads((out / "latest.json").read_text()), out))
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    all_rows, caps, calibrations = [], {}, {}
    for name in args.models.split(","):
        rows, cap, calibration = sweep(name, args.quick)
        all_rows.extend(rows)
        caps[rows[0]["model"]] = cap
        calibrations[rows[0]["model"]] = calibration
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    payload = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "budgets": "'N% of blocks' keeps that fraction of the transformer-block parameters (whole-block methods: "
        "round(N x layers) unique blocks); 'N% of all' keeps that fraction of all unique parameters, embeddings "
        "included",
        "caps": caps,
        "calibration": calibrations,
        "seconds": round(time.perf_counter() - start),
        "rows": all_rows,
    }
    for name in ("latest", f"latest-{stamp:%Y-%m-%d}"):
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(render(payload, out))


if __name__ == "__main__":
    main()
