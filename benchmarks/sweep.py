"""The side-by-side benchmark: every registered method at several budgets on the real models.

    python benchmarks/sweep.py            # full sweep  (make bench)
    python benchmarks/sweep.py --quick    # smoke test  (make bench-quick)

Encoders: all-MiniLM-L6-v2 and all-mpnet-base-v2 (fewer methods), STS-B test Spearman × 100, calibrated on
STS-B train sentences. Decoder:
SmolLM2-135M, perplexity on the second half of the WikiText-2 test file, calibrated on the first half (kept for
calibration and healing; the two never meet). Each calibrates on an equal mix of that text and pydoc_data.topics
paragraphs (common.calibration_data; --one-domain: that text alone). Budgets: "N% of blocks" keeps that fraction of the
transformer-block parameters (whole-block methods get round(N × layers) unique blocks; tying adds its
relaxations on top); "N% of all" keeps that fraction of all unique parameters, embeddings included. The real
fractions are in every row. Calibration runs once per model and is shared by every row. Every row also has an
off-domain figure, on text unlike the calibration data: encoders the cosine to the original's embeddings of
WikiText-2 test paragraphs (second half), decoders perplexity on the second half of Tiny Shakespeare. Writes
benchmarks/results/latest.{json,md}, pareto.png and dated copies (--quick: benchmarks/results/quick/).
"""

from __future__ import annotations

import copy
import datetime
import json
import time
from pathlib import Path

import torch
from common import DATA, bench_parser, machine, results_dir, runtime_cells, runtime_columns, runtime_of, runtime_ratios
from tasks import TEST_TASKS, Task
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.checkpoints.folded import load_source, load_tokenizer
from layerfold.core.budget import Budget, kept_fractions
from layerfold.core.errors import LayerfoldError
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.core.report import markdown_table, parameter_breakdown

BLOCK_BUDGETS = (1.0, 0.83, 0.67, 0.5)
QUICK_BLOCK_BUDGETS = (1.0, 0.5)
# Budgets counted over all unique parameters (embeddings included), for the methods that take any budget.
TOTAL_BUDGETS = (0.9, 0.84, 0.75, 0.65)
ANY_BUDGET = ("drop-even", "basis", "svd", "shortgpt", "laco", "prune")
QUICK_MINILM_METHODS = ("original", "tie-cycle", "prune", "svd")
GEMMA3_TOTAL_BUDGETS = (0.84,)  # one "of all" budget for the 270M model (the time limit of make bench)


# Per model: the methods run at the block budgets (None: all) and the "of all" budgets; --quick (CI's smoke test
# of this script): a row of each kind of fold, not a table — MiniLM a tie, width pruning and a factorisation,
# SmolLM2 an unrelaxed tie (the "of all" budget is smoke-tested on MiniLM), MPNet and Gemma two to four rows (a row costs
# them one to two minutes). SmolLM2's training-free methods of issue 5 run at the "of all" budgets (make bench's
# time limit), MPNet and Gemma fewer methods; encoders have no "of all" rows.
MPNET_METHODS = ("original", "drop-even", "shortgpt", "tie-cycle", "svd", "basis")
SMOLLM2_METHODS = ("original", "drop-first", "drop-even", "tie-cycle", "tie-sequence", "delta")
SWEEP = {
    "minilm": {False: (None, ()), True: (QUICK_MINILM_METHODS, ())},
    "mpnet": {False: (MPNET_METHODS, ()), True: (("original", "tie-cycle", "svd", "basis"), ())},
    "smollm2": {False: (SMOLLM2_METHODS, TOTAL_BUDGETS), True: (("original", "tie-cycle"), ())},
    "gemma3": {False: (MPNET_METHODS, GEMMA3_TOTAL_BUDGETS), True: (("original", "svd"), ())},
}
DECODERS = ("smollm2", "gemma3")


LM_EVAL_TASKS = ["glue_sst2_dev", "glue_rte_dev"]
LM_EVAL_LIMIT = {True: 16, False: 200}  # examples per task (the first ones of each dev file)


def lm_eval_accuracies(model, tokenizer, quick: bool) -> dict:
    """Zero-shot accuracy on GLUE SST-2 dev and RTE dev by lm-evaluation-harness (layerfold eval --task lm-eval)."""
    from layerfold.evaluation import lm_eval_tasks

    result = lm_eval_tasks.evaluate(model, tokenizer, LM_EVAL_TASKS, DATA / "glue", limit=LM_EVAL_LIMIT[quick])
    return {"accuracies": result["accuracies"], "examples": result["examples"]}


def task_for(name: str, quick: bool, one_domain: bool = False) -> Task:
    """The sweep's task of a model (tasks.TEST_TASKS), with lm-eval's accuracies for the decoders."""
    options = {"accuracies": lambda m, tokenizer: lm_eval_accuracies(m, tokenizer, quick)} if name in DECODERS else {}
    return TEST_TASKS[name](quick, one_domain, **options)


def jobs_for(name: str, quick: bool) -> list[tuple[registry.Method, Budget, dict]]:
    block_methods, total_budgets = SWEEP[name][quick]
    budgets = [Budget(b, blocks_only=True) for b in (QUICK_BLOCK_BUDGETS if quick else BLOCK_BUDGETS)]
    budgets += [Budget(b) for b in total_budgets]
    jobs = []
    for budget in budgets:
        for method in registry.REGISTRY.values():
            if (method.name == "original") != (budget.keep == 1.0):
                continue
            if not budget.blocks_only and method.name not in ANY_BUDGET:
                continue
            if budget.blocks_only and block_methods is not None and method.name not in block_methods:
                continue
            variants = method.variants(quick)
            if quick and name == "smollm2":  # its smoke test: the first variant (a tie of rank 0; CI's time limit)
                variants = variants[:1]
            jobs += [(method, budget, options) for options in variants]
    return jobs


def sweep(task_name: str, quick: bool, one_domain: bool = False) -> tuple[list[dict], Task, dict]:
    task = task_for(task_name, quick, one_domain)
    original = load_source(task.path)
    base = parameter_breakdown(original)
    start = time.perf_counter()
    batches = calibration_batches(
        original, load_tokenizer(task.path), task.calibration, tokens=task.tokens
    )
    calibration = Calibration(original, batches, {"data": task.calibration_text})
    if not (quick and task_name == "smollm2"):  # SmolLM2's quick rows fit nothing to calibration data
        calibration.statistics()  # once, before any row, so that rows' seconds exclude it
    calibration_info = {**calibration.settings, "seconds": round(time.perf_counter() - start, 1)}
    rows = []
    for method, budget, options in tqdm(jobs_for(task_name, quick), desc=task.model, unit="run"):
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
            value = task.value(model, original)
            off_domain = task.off_domain[1](model, original) if task.off_domain else None
        lm_eval = task.accuracies(model) if task.accuracies is not None else None
        seconds = round(time.perf_counter() - start, 1)
        # --quick times the original and the first fold only (each timing is a fresh process; CI's time limit)
        timed = not quick or len(rows) < 2
        runtime = runtime_of(model, task.path, quick=quick, **task.runtime_inputs) if timed else None
        rows.append(
            {
                **row,
                **kept_fractions(base, params),
                "unique_params": params["total"],
                "value": value,
                "off_domain": off_domain,
                "seconds": seconds,
                **({"runtime": runtime} if runtime is not None else {}),
                **({"lm_eval": lm_eval} if lm_eval is not None else {}),
            }
        )
        if method.name.startswith(("tie-", "drop-")):
            rows[-1]["options"]["unique_blocks"] = registry.unique_blocks_for(original, budget)
        tqdm.write(json.dumps(rows[-1]))
        del model
    runtime_ratios(rows)
    return rows, task, calibration_info


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
                    "-",
                    *["-"] * len(accuracy_columns(rows)),
                    f"{r['seconds']:.0f}",
                    *["-"] * len(runtime_columns(rows)),
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
                f"{r['off_domain']:.4g}" if r.get("off_domain") is not None else "-",
                *[f"{r['lm_eval']['accuracies'][t]:.3f}" if r.get("lm_eval") else "-" for t in accuracy_columns(rows)],
                f"{r['seconds']:.0f}",
                *runtime_cells(r, runtime_columns(rows)),
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
            "off-domain",
            *(f"{t.removeprefix('glue_').removesuffix('_dev').upper()} acc" for t in accuracy_columns(rows)),
            "seconds",
            *(label for _, label in runtime_columns(rows)),
        ],
        body,
    )


def accuracy_columns(rows: list[dict]) -> list[str]:
    return LM_EVAL_TASKS if any(r.get("lm_eval") for r in rows) else []


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


def method_colours(rows: list[dict]) -> dict[str, tuple]:
    """One colour per method, the same in every panel."""
    import matplotlib

    methods = sorted({r["method"] for r in rows})
    palette = matplotlib.colormaps["tab20"]
    return {method: palette(i % 20) for i, method in enumerate(methods)}


def pareto_front(points: list[dict], key, better) -> list[dict]:
    """Rows that no smaller row beats on ``key`` (``better(a, b)``: a is better than b)."""
    front, best = [], None
    for r in sorted(points, key=lambda r: (r["unique_params"], -key(r) if better(1, 0) else key(r))):
        if best is None or better(key(r), best):
            front.append(r)
            best = key(r)
    return front


def chart(rows: list[dict], path: Path) -> None:
    """Quality against unique parameters (top) and run-time speed against unique parameters (bottom: decode
    tokens/s for decoders, sentences/s for encoders, as a ratio to the original measured in the same run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = method_colours(rows)
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 9.5), squeeze=False)
    for column, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model and r["value"] is not None]
        lower_is_better = mine[0]["metric"] == "perplexity"
        ax = axes[0][column]
        for method in sorted({r["method"] for r in mine}):
            points = [r for r in mine if r["method"] == method]
            ax.scatter([r["unique_params"] / 1e6 for r in points], [r["value"] for r in points], label=method,
                       s=28, alpha=0.85, color=colours[method])  # fmt: skip
        front = pareto_front(mine, lambda r: r["value"], (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b))
        ax.plot([r["unique_params"] / 1e6 for r in front], [r["value"] for r in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("unique parameters (M)")
        ax.set_ylabel(mine[0]["metric"] + (" (log scale, lower is better)" if lower_is_better else " (higher is better)"))
        if lower_is_better:
            ax.set_yscale("log")
        ax.set_title(f"{model}: quality against size (training-free)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)

        ax = axes[1][column]
        speed_key = "decode_tokens_per_second" if lower_is_better else "sentences_per_second"
        timed = [r for r in mine if (r.get("runtime") or {}).get("ratios", {}).get(speed_key) is not None]
        for method in sorted({r["method"] for r in timed}):
            points = [r for r in timed if r["method"] == method]
            ax.scatter([r["unique_params"] / 1e6 for r in points], [r["runtime"]["ratios"][speed_key] for r in points],
                       label=method, s=28, alpha=0.85, color=colours[method])  # fmt: skip
        ax.axhline(1.0, color="grey", lw=1)
        if lower_is_better:
            ax.axhline(0.95, color="red", lw=1, ls=":", label="target 0.95 × original")
        ax.set_xlabel("unique parameters (M)")
        ax.set_ylabel(("decode tokens/s" if lower_is_better else "sentences/s") + " ÷ original's (higher is faster)")
        ax.set_title(f"{model}: speed against size (fresh process, this machine)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runtime_protocol_text(quick: bool) -> str:
    from layerfold.evaluation.metrics import QUICK_RUNTIME_PROTOCOL, RUNTIME_PROTOCOL

    p = QUICK_RUNTIME_PROTOCOL if quick else RUNTIME_PROTOCOL
    return (f"decoders: batch 1, greedy, KV cache, {p['new_tokens']} new tokens after a {p['prompt']}-token prompt, "
            f"prefill of one {p['prefill']}-token sequence; encoders: {p['sentences']} sentences in batches of 32; "
            f"median of {p['repeats']} run(s) after a warm-up; peak RSS of that process")  # fmt: skip


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
            f"batches, {calibration['seconds']:.0f} s (once, shared by every row)."
            + (f" Off-domain: {payload['off_domain'][model]}." if payload.get("off_domain", {}).get(model) else "")
            + f"\n\n{table(mine)}"
        )
    markdown = "\n\n".join(
        [
            f"# layerfold benchmark ({'quick' if payload['quick'] else 'full'}), {stamp:%Y-%m-%d}",
            f"Machine: {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
            f"{info['platform']}. Total {payload['seconds']} s. Training-free rows only (no healing yet).",
            f"Budgets: {payload['budgets']}.",
            "## Best options of each method at each budget\n\n" + summary(rows),
            *sections,
            f"SST2/RTE acc (SmolLM2): zero-shot accuracy by lm-evaluation-harness on the first "
            f"{LM_EVAL_LIMIT[payload['quick']]} examples of GLUE SST-2 dev and of RTE dev (log-likelihood of the label "
            "words; `layerfold eval --task lm-eval`); chance is about 0.5 on both.",
            "Run-time columns: each row's model saved and then loaded and run in a fresh process "
            f"({runtime_protocol_text(payload['quick'])}); ratios are to the original measured in the same run.",
            "![quality and speed against unique parameters](pareto.png)",
        ]
    )
    for name in ("latest", f"latest-{stamp:%Y-%m-%d}"):
        (out / f"{name}.md").write_text(markdown + "\n")
    for name in ("pareto", f"pareto-{stamp:%Y-%m-%d}"):
        chart(rows, out / f"{name}.png")
    return markdown


def main() -> None:
    parser = bench_parser(__doc__, models=",".join(SWEEP))
    parser.add_argument("--render", action="store_true", help="only redraw table and chart from latest.json")
    parser.add_argument("--one-domain", action="store_true", help="calibrate on each model's own domain only "
                        "(the protocol before the mix; see common.calibration_data)")  # fmt: skip
    args = parser.parse_args()
    out = results_dir(args.quick)
    if args.render:
        print(render(json.loads((out / "latest.json").read_text()), out))
        return
    torch.manual_seed(0)
    start = time.perf_counter()
    all_rows, caps, calibrations, off_domain = [], {}, {}, {}
    for name in (args.models or ",".join(SWEEP)).split(","):
        rows, task, calibration = sweep(name, args.quick, args.one_domain)
        all_rows.extend(rows)
        caps[task.model] = task.cap
        calibrations[task.model] = calibration
        off_domain[task.model] = task.off_domain[0] if task.off_domain else None
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
        "off_domain": off_domain,
        "seconds": round(time.perf_counter() - start),
        "rows": all_rows,
    }
    for name in ("latest", f"latest-{stamp:%Y-%m-%d}"):
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(render(payload, out))


if __name__ == "__main__":
    main()
