"""Width pruning against its peers (issue 20): layerfold's ``prune`` rows, the planner's choice and the
installable tools a user would try instead, run side by side on the same models, data and budgets.

    python benchmarks/width.py                          # make bench: both models, every budget
    python benchmarks/width.py --models minilm --budgets 0.67 --rows prune-activation-mlp,textpruner

all-MiniLM-L6-v2 at 83 / 67 / 50 % of the block parameters; SmolLM2-135M at 90 / 84 / 75 % of all parameters
(the sweep's "of all" budgets that width pruning reaches). Calibration as benchmarks/relax_forms.py: MiniLM
STS-B train sentences + pydoc paragraphs (32,768 tokens); SmolLM2 the first half of WikiText-2 test without
its last 30,000 characters + pydoc (32,768 tokens). Rows:

- ``prune-*``: layerfold's width pruning (``--method prune``) with each importance score (``fisher`` on SmolLM2
  only: for an encoder it is ``activation``), MLP channels only or
  heads and channels, global or uniform widths, least-squares compensated; training-free.
- ``svd``: the best earlier training-free row at these budgets (whitened per-layer SVD, sensitivity ranks, ends
  whole), for comparison.
- ``auto``: the planner (``layerfold compress``'s search over every registered candidate, width included),
  its chosen plan refitted on the rows' calibration batches.
- ``textpruner`` (MiniLM; ``pip install textpruner --no-deps``): its self-supervised mode (``use_logits``, the
  model's own output distribution as the target) on 2,048 unlabelled STS-B train sentences, heads and FFN neurons
  non-uniform across layers, one iteration, the targets that keep the budget (``keep_shape``: pruned weights
  zeroed, counted as removed).
- ``torch-pruning-mlp`` (SmolLM2; ``pip install torch-pruning``): its MetaPruner with first-order Taylor
  importance ranked globally over the MLP channels only (attention and the head ignored), gradients of the LM
  loss on the rows' first 8 calibration windows (1,024 tokens each), the ratio that keeps the budget.

Figures: MiniLM STS-B dev (development) and test Spearman, and the cosine to the original's embeddings of
WikiText-2 paragraphs (second half; off-domain); SmolLM2 perplexity on the 30,000 dev characters, on the
second half of WikiText-2 test (first 4,096 tokens) and on the second half of Tiny Shakespeare (first 4,096
tokens; off-domain). Uniform rows are also exported to the plain architecture and their run-time cost measured
beside the original's (layerfold.evaluation.metrics.runtime_cost, a fresh process each, the best of three for each, the
original measured again right after each export). Options were chosen on the dev
figures only. Writes benchmarks/results/width.{json,md} and a dated copy.
"""

from __future__ import annotations

import copy
import datetime
import json
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, DATA, RESULTS, RUNTIME_KEYS, bench_parser, merge_models, ratios_to, write_results
from tasks import DEV_TASKS, Task
from tqdm.auto import tqdm

import layerfold
import layerfold.methods.registry as registry
from layerfold.core.budget import Budget, kept_fractions
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.jobs.compress import plan_for_budget, planning_analysis, prepare
from layerfold.core.texts import read_sts
from layerfold.core.errors import LayerfoldError
from layerfold.evaluation.metrics import runtime_cost
from layerfold.checkpoints.folded import load_source
from layerfold.methods.planner import Proxy
from layerfold.core.report import markdown_table, parameter_breakdown

MLP = {"target": "mlp", "min_keep": 0.1}
PRUNE_ROWS = {  # the method's defaults: activation, heads and channels, min_keep 0.25 (chosen on STS-B dev)
    "prune-activation-both": {},
    "prune-activation-both-uniform": {"uniform": True},
    "prune-activation-mlp": dict(MLP),
    "prune-activation-mlp-uniform": {**MLP, "uniform": True},
    "prune-fisher-both": {"importance": "fisher"},
    "prune-fisher-mlp": {**MLP, "importance": "fisher"},
    "prune-fluctuation-both": {"importance": "fluctuation"},
    "prune-taylor-mlp": {**MLP, "importance": "taylor"},
    "prune-self-supervised-both": {"importance": "self-supervised"},
    "prune-magnitude-both": {"importance": "magnitude"},
    "prune-activation-both-uncompensated": {"compensate": False},
}
SVD = {"allocation": "sensitivity", "whole": [0, -1]}
# --quick (CI's smoke test): MiniLM at its middle budget, a uniform prune (exported and timed) and svd
QUICK_ROWS = ("prune-activation-both-uniform", "svd")
MODELS = {
    "minilm": {"budgets": (0.83, 0.67, 0.5), "blocks_only": True, "peer": "textpruner",  # fisher = activation there
               "rows": [r for r in PRUNE_ROWS if "fisher" not in r]},
    "smollm2": {"budgets": (0.9, 0.84, 0.75), "blocks_only": False, "peer": "torch-pruning-mlp",
                "rows": list(PRUNE_ROWS)},
}  # fmt: skip


# ---- peers ------------------------------------------------------------------------------------------------------
def textpruner_row(original, tokenizer, budget: Budget) -> tuple[torch.nn.Module, str, float]:
    """textpruner's self-supervised pruning of heads and FFN neurons at the targets that keep ``budget`` of the
    block parameters; returns the model (pruned weights zeroed), a description and the kept block fraction."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    config = original.config
    heads, ffn, hidden = config.num_attention_heads, config.intermediate_size, config.hidden_size
    layers = config.num_hidden_layers
    per_head = 4 * hidden * (hidden // heads) + 3 * (hidden // heads)  # q, k, v rows and o columns with biases
    per_neuron = 2 * hidden + 1
    blocks = parameter_breakdown(original)["blocks"]
    fixed = blocks - layers * (heads * per_head + ffn * per_neuron)  # norms and output biases stay
    target = budget.keep * blocks
    kept_heads = max(1, round(heads * budget.keep))
    kept_ffn = max(1, math.floor((target / layers - fixed / layers - kept_heads * per_head) / per_neuron))
    train = read_sts(DATA / "stsbenchmark" / "sts-train.csv")
    sentences = [s for pair in train for s in (pair.first, pair.second)][:2048]

    class Sentences(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(sentences) // 32

        def __getitem__(self, i: int) -> dict:
            chunk = sentences[i * 32 : (i + 1) * 32]
            return dict(tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    model = copy.deepcopy(original)
    settings = TransformerPruningConfig(target_ffn_size=kept_ffn, target_num_of_heads=kept_heads,
                                        pruning_method="iterative", n_iters=1, use_logits=True,
                                        head_even_masking=False, ffn_even_masking=False)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=CACHE) as out:
        pruner = TransformerPruner(model, transformer_pruning_config=settings,
                                   general_config=GeneralConfig(use_device="cpu", output_dir=out))  # fmt: skip
        loader = torch.utils.data.DataLoader(Sentences(), batch_size=None)
        pruner.prune(dataloader=loader, adaptor=lambda output: output.last_hidden_state, keep_shape=True,
                     save_model=False)  # fmt: skip
        head_mask, ffn_mask = pruner.head_mask, pruner.ffn_mask
    kept = fixed + int(head_mask.sum()) * per_head + int(ffn_mask.sum()) * per_neuron
    detail = f"{kept_heads} heads, {kept_ffn} FFN neurons per layer on average (self-supervised, non-uniform)"
    return model.eval(), detail, kept / blocks


def torch_pruning_row(original, calibration: Calibration, budget: Budget) -> tuple[torch.nn.Module, str, float]:
    """Torch-Pruning's MetaPruner: Taylor importance ranked globally over SmolLM2's MLP channels only."""
    import torch_pruning as tp

    model = copy.deepcopy(original).eval()
    layers = model.model.layers
    per_channel = 3 * model.config.hidden_size
    channels = sum(layer.mlp.down_proj.in_features for layer in layers)
    ratio = budget.reduction(model) / (per_channel * channels)
    ignored = [model.lm_head, *(layer.self_attn for layer in layers)]
    example = calibration.batches[0]["input_ids"][:1, :64]
    pruner = tp.pruner.MetaPruner(model, example_inputs=example, importance=tp.importance.TaylorImportance(),
                                  global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored,
                                  output_transform=lambda output: output.logits)  # fmt: skip
    model.zero_grad()
    for batch in calibration.batches[:8]:
        ids, mask = batch["input_ids"][:, :1024], batch["attention_mask"][:, :1024]
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    widths = [layer.mlp.down_proj.in_features for layer in layers]
    kept = parameter_breakdown(model)["total"] / parameter_breakdown(original)["total"]
    return model, f"MLP widths {min(widths)} to {max(widths)} (global Taylor, ratio {ratio:.3f})", kept


# ---- rows ------------------------------------------------------------------------------------------------------
def setup(name: str, quick: bool) -> Task:
    """relax_forms' development task (tasks.DEV_TASKS) with the off-domain figure in place of its first-half one."""
    task = DEV_TASKS[name](quick=quick)
    if name == "minilm":
        return task.keeping("STS-B dev", "STS-B test", **{"WikiText cosine (off-domain)": task.off_domain[1]})
    return task.keeping("WikiText dev ppl", "WikiText test ppl", **{"Shakespeare test ppl (off-domain)":
                                                                    task.off_domain[1]})  # fmt: skip


RUNTIME_TRIES = 3


def best_runtime(path: Path, inputs: dict, quick: bool) -> dict:
    """The best of RUNTIME_TRIES fresh-process measurements (one run varied by up to 30 % here): the highest
    throughputs, the lowest memory (--quick: one, with the quick protocol)."""
    tries = [runtime_cost(path, quick=quick, **inputs) for _ in range(1 if quick else RUNTIME_TRIES)]
    best = dict(tries[0])
    for key in ("decode_tokens_per_second", "prefill_tokens_per_second", "sentences_per_second"):
        if key in best:
            best[key] = max(t[key] for t in tries)
    best["peak_rss_bytes"] = min(t["peak_rss_bytes"] for t in tries)
    return best


def export_runtime(model, task: Task, work: Path, quick: bool) -> dict:
    """Save, export to the plain architecture, and measure the export's and the original's run-time cost, each
    the best of three fresh processes, one after the other (so that both see the machine in the same state)."""
    folded, plain = work / "folded", work / "plain"
    layerfold.save(model, folded, source=task.path, overwrite=True)
    layerfold.export(folded, plain, overwrite=True)
    runtime = best_runtime(plain, task.runtime_inputs, quick)
    original = best_runtime(task.path, task.runtime_inputs, quick)
    runtime["ratios"] = ratios_to(runtime, original)
    runtime["original"] = {k: v for k, v in original.items() if k in RUNTIME_KEYS}
    return runtime


def run(name: str, budgets, wanted: list[str] | None, work: Path, quick: bool = False) -> dict:
    spec = MODELS[name]
    task = setup(name, quick)
    tokenizer = task.tokenizer
    original = load_source(task.path, dtype=torch.float32)
    batches = calibration_batches(original, tokenizer, task.calibration, tokens=task.tokens)
    calibration = Calibration(original, batches, {"data": task.calibration_text}, mask_token_id=tokenizer.mask_token_id)
    calibration.statistics()
    base = parameter_breakdown(original)
    rows = [{"budget": 1.0, "row": "original", **task.figures(original, original),
             "runtime": best_runtime(task.path, task.runtime_inputs, quick)}]  # fmt: skip
    names = [*spec["rows"], "svd", "auto", spec["peer"]]
    names = [n for n in names if wanted is None or n in wanted]
    prepared = analysis = proxy = None
    for keep in budgets:
        budget = Budget(keep, blocks_only=spec["blocks_only"])
        for row_name in tqdm(names, desc=f"{task.model} {keep:g}", unit="row"):
            start = time.perf_counter()
            row = {"budget": keep, "row": row_name}
            try:
                if row_name in PRUNE_ROWS:
                    method, options = registry.get("prune"), PRUNE_ROWS[row_name]
                    model = registry.build(method, copy.deepcopy(original), budget, calibration, **options)
                    row["detail"] = model.base_model.layerfold_shared.plan.describe()
                elif row_name == "svd":
                    model = registry.build(registry.get("svd"), copy.deepcopy(original), budget, calibration, **SVD)
                    row["detail"] = "sensitivity ranks, ends whole"
                elif row_name == "auto":
                    if prepared is None:
                        prepared = prepare(task.path, task.calibration, tokens=task.tokens)
                        analysis = planning_analysis(prepared, progress=False)
                        proxy = Proxy(prepared.model, prepared.proxy_batches)
                    _, result = plan_for_budget(prepared, budget, analysis=analysis, proxy=proxy, refit=calibration,
                                                progress=False)  # fmt: skip
                    model = result.best_model
                    row["detail"] = f"{result.best.name}: {result.best.plan.describe()}"
                elif row_name == "textpruner":
                    model, row["detail"], row["kept (masks)"] = textpruner_row(original, tokenizer, budget)
                else:
                    model, row["detail"], row["kept (masks)"] = torch_pruning_row(original, calibration, budget)
            except (LayerfoldError, ImportError) as err:
                row["detail"] = f"not run: {err}"
                rows.append(row)
                tqdm.write(str(row))
                continue
            row["fold_s"] = round(time.perf_counter() - start, 1)
            fractions = kept_fractions(base, parameter_breakdown(model))
            if "kept (masks)" in row and name == "minilm":  # zeroed weights, counted as removed
                fractions["keep_blocks"] = row.pop("kept (masks)")
                removed = (1 - fractions["keep_blocks"]) * base["blocks"]
                fractions["keep"] = (base["total"] - removed) / base["total"]
            row.update({k: round(v, 4) for k, v in fractions.items()})
            with torch.no_grad():
                row.update(task.figures(model, original))
            if row_name.endswith("uniform"):
                row["runtime"] = export_runtime(model, task, work / row_name, quick)
            rows.append(row)
            tqdm.write(str({k: v for k, v in row.items() if k != "runtime"}))
            del model
    return {"model": task.model, "calibration": task.calibration_text, "off_domain": task.off_domain[0],
            "budget_counts": "blocks" if spec["blocks_only"] else "all", "rows": rows}  # fmt: skip


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``new``'s rows over ``old``'s, by model, budget and row, each row keeping the date it was measured."""
    today = datetime.date.today().isoformat()
    results = merge_models(old, new, key=lambda row: (row["budget"], row["row"]), stamp=lambda row: {"measured": today})
    for result in results:
        result["rows"].sort(key=lambda row: (-row["budget"], row["row"] != "original"))
    return results


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1.5 else f"{value:.2f}"
    return str(value)


def render(results: list[dict]) -> str:
    lines = ["# Width pruning and its peers (benchmarks/width.py)", ""]
    for result in results:
        figures = [k for k in result["rows"][0] if k not in ("budget", "row", "runtime", "measured")]
        runtime_keys = [k for k in ("decode_tokens_per_second", "sentences_per_second") if k in result["rows"][0]["runtime"]]
        header = ["budget", "row", "kept", *figures, *(f"{k} (× orig.)" for k in runtime_keys), "detail"]
        table = []
        for row in result["rows"]:
            kept = row.get("keep_blocks" if result["budget_counts"] == "blocks" else "keep", 1.0 if row["row"] == "original" else None)
            runtime = row.get("runtime") or {}
            cells = [f"{runtime[k]:.1f} ({runtime.get('ratios', {}).get(k, 1.0):.2f})" if k in runtime else "-"
                     for k in runtime_keys]  # fmt: skip
            table.append([f"{row['budget']:g}", row["row"], fmt(kept), *(fmt(row.get(f)) for f in figures), *cells,
                          row.get("detail", "")])  # fmt: skip
        lines += [f"## {result['model']} (budget counts {result['budget_counts']} parameters)", "",
                  f"Calibration: {result['calibration']}. Off-domain: {result['off_domain']}.", "",
                  markdown_table(header, table), ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, models="minilm,smollm2; --quick: minilm")
    parser.add_argument("--budgets", default=None, help="comma-separated fractions (default: each model's)")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--merge", action="store_true", help="replace rows of results/width.json by model, budget "
                        "and row instead of starting it again")  # fmt: skip
    args = parser.parse_args()
    wanted = args.rows.split(",") if args.rows else list(QUICK_ROWS) if args.quick else None
    results = []
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        for name in (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(","):
            budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else MODELS[name]["budgets"]
            results.append(run(name, budgets[1:2] if args.quick and not args.budgets else budgets, wanted, Path(work),
                               args.quick))  # fmt: skip
    if args.merge and (RESULTS / "width.json").exists():
        results = merged(json.loads((RESULTS / "width.json").read_text())["results"], results)
    peers = {n: importlib.util.find_spec(m) is not None for n, m in (("textpruner", "textpruner"),
                                                                      ("torch-pruning", "torch_pruning"))}  # fmt: skip
    path = write_results("width", {"results": results, "peers_installed": peers}, render(results), quick=args.quick)
    print(render(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
