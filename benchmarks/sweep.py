"""The side-by-side benchmark: every registered method at several budgets on the real models.

    python benchmarks/sweep.py            # full sweep  (make bench)
    python benchmarks/sweep.py --quick    # smoke test  (make bench-quick)

Encoder: all-MiniLM-L6-v2, STS-B test Spearman × 100. Decoder: SmolLM2-135M, perplexity on the second half of
the WikiText-2 test articles (the first half is kept for calibration and healing). A budget is the fraction of
the transformer-block parameters kept; a method gets round(budget × layers) unique blocks (tying adds its
relaxations on top: the real fractions are in every row). Writes benchmarks/results/latest.{json,md},
pareto.png and dated copies (--quick: benchmarks/results/quick/).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, machine, smollm2_dir
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.data import read_sts, wikitext_half
from layerfold.demo import default_model_path
from layerfold.evaluate import perplexity, sts_spearman, tokenize_text
from layerfold.io import load_source, load_tokenizer
from layerfold.report import markdown_table, parameter_breakdown

BUDGETS = (1.0, 0.83, 0.67, 0.5)
QUICK_BUDGETS = (1.0, 0.5)


def minilm_task(quick: bool):
    path = default_model_path()
    pairs = read_sts(DATA / "stsbenchmark" / "sts-test.csv", limit=300 if quick else None)
    tokenizer = load_tokenizer(path)
    cap = f"STS-B test, {len(pairs)} pairs"
    return "all-MiniLM-L6-v2", path, "spearman", cap, lambda model: sts_spearman(model, tokenizer, pairs)["value"]


def smollm2_task(quick: bool):
    path = smollm2_dir()
    tokens = 2048 if quick else 4096
    ids = tokenize_text(
        load_tokenizer(path), wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "second"), tokens
    )
    cap = (
        f"WikiText-2 test, second half of the articles, first {ids.numel()} tokens, non-overlapping 1,024-token windows"
    )
    return (
        "SmolLM2-135M",
        path,
        "perplexity",
        cap,
        lambda model: perplexity(model, ids, max_length=1024, stride=1024)["value"],
    )


TASKS = {"minilm": minilm_task, "smollm2": smollm2_task}


def sweep(task_name: str, quick: bool) -> tuple[list[dict], str]:
    model_name, path, metric, cap, measure = TASKS[task_name](quick)
    original = load_source(path)
    layers = registry.num_layers(original)
    base = parameter_breakdown(original)
    jobs = []
    for method in registry.REGISTRY.values():
        for budget in QUICK_BUDGETS if quick else BUDGETS:
            if (method.name == "original") != (budget == 1.0):
                continue
            for options in method.variants(quick):
                jobs.append((method, budget, options))
    rows = []
    for method, budget, options in tqdm(jobs, desc=model_name, unit="run"):
        start = time.perf_counter()
        unique_blocks = round(budget * layers)
        model = method.build(copy.deepcopy(original), unique_blocks, **options)
        params = parameter_breakdown(model)
        with torch.no_grad():
            value = measure(model)
        rows.append(
            {
                "model": model_name,
                "method": method.name,
                "options": {"unique_blocks": unique_blocks, **options},
                "budget_blocks": budget,
                "keep": params["total"] / base["total"],
                "keep_blocks": params["blocks"] / base["blocks"],
                "unique_params": params["total"],
                "metric": metric,
                "value": value,
                "healed": False,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        tqdm.write(json.dumps(rows[-1]))
        del model
    return rows, cap


def table(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (-r["budget_blocks"], r["method"], str(r["options"]))):
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "unique_blocks")
        body.append(
            [
                r["method"],
                options or "-",
                f"{r['budget_blocks']:.0%}",
                r["options"]["unique_blocks"],
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
        key = (r["model"], r["budget_blocks"], r["method"])
        if key not in best:
            best[key] = r
        elif (r["value"] < best[key]["value"]) == (r["metric"] == "perplexity"):
            best[key] = r
    body = []
    for (model, budget, method), r in sorted(best.items(), key=lambda item: (item[0][0], -item[0][1], item[0][2])):
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "unique_blocks")
        body.append(
            [
                model,
                f"{budget:.0%}",
                method,
                options or "-",
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
        mine = [r for r in rows if r["model"] == model]
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
        sections.append(f"## {model}: {mine[0]['metric']} ({payload['caps'][model]})\n\n{table(mine)}")
    markdown = "\n\n".join(
        [
            f"# layerfold benchmark ({'quick' if payload['quick'] else 'full'}), {stamp:%Y-%m-%d}",
            f"Machine: {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
            f"{info['platform']}. Total {payload['seconds']} s. Training-free rows only (no healing yet). "
            f"Budget: {payload['budgets']}.",
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
    all_rows, caps = [], {}
    for name in args.models.split(","):
        rows, cap = sweep(name, args.quick)
        all_rows.extend(rows)
        caps[rows[0]["model"]] = cap
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    payload = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "budgets": "fraction of transformer-block parameters; unique blocks = round(budget x layers)",
        "caps": caps,
        "seconds": round(time.perf_counter() - start),
        "rows": all_rows,
    }
    for name in ("latest", f"latest-{stamp:%Y-%m-%d}"):
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(render(payload, out))


if __name__ == "__main__":
    main()
