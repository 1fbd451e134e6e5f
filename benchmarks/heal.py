"""Healed rows: each tie, removal and basis method at 50 % of the block parameters, before and after the same
healing budget, on the real models; and heal throughput next to a plain Trainer fine-tune of the original.

    python benchmarks/heal.py            # make bench
    python benchmarks/heal.py --quick    # make bench-quick (MiniLM, one method, a few steps)

MiniLM: heal data STS-B train sentences (never the test set), STS-B test Spearman × 100. SmolLM2: heal data
the first half of the WikiText-2 test file, perplexity on the first 4,096 tokens of the second half (the
sweep's protocol). Both heal (and calibrate) on an equal mix of that text and pydoc_data.topics paragraphs
(common.calibration_data; --one-domain: that text alone). Calibration (for the calibrated methods) uses the
same heal data. Every method gets the same budget: steps × batch × tokens, stated in the table. Writes
benchmarks/results/heal.{json,md} (--quick: benchmarks/results/quick/).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import (
    bench_parser,
    merge_models,
    onnx_sts_spearman,
    paraphrase_minilm_onnx,
    runtime_cells,
    runtime_columns,
    runtime_ratios,
    write_results,
    RESULTS,
)
from tasks import Task, minilm, smollm2, sts_test_pairs
from tqdm.auto import tqdm

import layerfold.methods.registry as registry
from layerfold.checkpoints.folded import load, load_source, load_tokenizer, save
from layerfold.core.budget import Budget, kept_fractions
from layerfold.core.report import markdown_table, parameter_breakdown
from layerfold.engine.calibrate import Calibration, calibration_batches
from layerfold.evaluation.metrics import runtime_cost
from layerfold.heal import heal

ENDS_WHOLE = {"allocation": "sensitivity", "whole": [0, -1]}
# Every tie, removal and basis method, with the options that did best training-free in the sweep.
METHODS = [
    ("tie-cycle", {"rank": 0}),
    ("tie-sequence", {"rank": 0}),
    ("drop-even", {}),
    ("shortgpt", {"score": "influence"}),
    ("laco", {"merge": 3, "threshold": 0.0}),
    ("basis", ENDS_WHOLE),
    ("svd", ENDS_WHOLE),
    ("delta", {}),  # adjacent runs share a least-squares weight, whitened deltas fill the budget
]
QUICK_METHODS = [("tie-cycle", {"rank": 0})]  # CI's smoke test: one fold healed, inside CI's time limit


STAGES = ("e2e", "both")  # each method is healed once per stage, from the same fold


def heal_task(name: str, quick: bool, one_domain: bool = False) -> Task:
    """The sweep's task of a model (tasks.py) with this benchmark's heal budget. --quick (CI's smoke test, MiniLM)
    trains fewer steps, block-wise fewer too, and cuts the mix's pydoc paragraphs at 64 tokens."""
    if name == "smollm2":  # perplexity on 4,096 tokens, calibrated on 32,768, as the sweep's full run
        return smollm2(quick, one_domain, eval_tokens=4096, tokens=32768, windows="")
    task = minilm(quick, one_domain)
    if quick:
        task.heal = dataclasses.replace(task.heal, steps=5, eval_every=5, block_steps=10, seq_len=64)
    return task


def peers(task: Task, quick: bool) -> list[dict]:
    """Models of the folded size one could use instead (MiniLM: paraphrase-MiniLM-L3-v2, ONNX)."""
    if task.metric != "spearman":
        return []
    score = onnx_sts_spearman(paraphrase_minilm_onnx(), load_tokenizer(task.path), sts_test_pairs(quick))
    return [{"model": task.model, "method": "peer: paraphrase-MiniLM-L3-v2 (ONNX, onnxruntime)", "options": {},
             "parameters": score["parameters"], "training_free": score["value"], "healed": None}]  # fmt: skip


def plain_finetune_throughput(task: Task, steps: int, work: Path) -> dict:
    """Tokens/s of a plain Trainer fine-tune (LM loss) of the original with the heal's batch and window."""
    from transformers import Trainer, TrainingArguments

    from layerfold.heal import prepare_data

    model = load_source(task.path, dtype=torch.float32)
    data = prepare_data(
        load_tokenizer(task.path), task.heal_data, causal=True, seq_len=task.heal.seq_len, held_out=1, limit=None
    )
    examples = [{"input_ids": t, "labels": t} for t in data.train]
    args = TrainingArguments(
        output_dir=str(work / "plain"),
        max_steps=steps,
        per_device_train_batch_size=task.heal.batch,
        learning_rate=task.heal.lr,
        save_strategy="no",
        report_to="none",
        logging_steps=steps,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = steps * task.heal.batch * task.heal.seq_len
    return {"steps": steps, "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_second": tokens / seconds}


def run(task: Task, methods: list[tuple[str, dict]], stages: tuple[str, ...], quick: bool,
        work: Path) -> tuple[list[dict], dict]:  # fmt: skip
    """The original's row, then each method folded once and healed per stage from the same fold. Over 80 lines:
    the rows' columns are written out where they are measured."""
    original = load_source(task.path, dtype=torch.float32)
    base = parameter_breakdown(original)
    off = task.off_domain[1] if task.off_domain else None
    rows = [
        {
            "model": task.model,
            "method": "original",
            "options": {},
            "keep_blocks": 1.0,
            "keep": 1.0,
            "training_free": task.value(original),
            "healed": None,
            "off_domain": off(original, original) if off else None,
            "runtime": runtime_cost(task.path, quick=quick, **task.runtime_inputs),
        }
    ]
    for peer in peers(task, quick):
        rows.append({**peer, "keep": peer["parameters"] / base["total"]})
    calibration = None
    if any(registry.get(name).calibrated for name, _ in methods):
        batches = calibration_batches(
            original, load_tokenizer(task.path), task.heal_data, tokens=task.tokens
        )
        calibration = Calibration(original, batches, {"data": task.calibration_text})
    for name, options in tqdm(methods, desc=f"{task.model} heal", unit="method"):
        method = registry.get(name)
        folded = registry.build(method, copy.deepcopy(original), Budget(0.5, blocks_only=True), calibration, **options)
        fractions = kept_fractions(base, parameter_breakdown(folded))
        folded_dir = work / f"{task.model}-{name}"
        save(folded, folded_dir, source=task.path, overwrite=True)
        before = task.value(folded)
        off_before = off(folded, original) if off else None
        del folded
        for stage in stages:  # the same fold, healed end to end only, and block-wise first
            healed_dir = work / f"{task.model}-{name}-{stage}-healed"
            config = dataclasses.replace(task.heal, stage=stage)
            report = heal(folded_dir, task.path, task.heal_data, healed_dir, config, overwrite=True)
            healed = load(healed_dir)
            blockwise = report["blockwise"] or {}
            rows.append(
                {
                    "model": task.model,
                    "method": name,
                    "stage": stage,
                    "options": options,
                    "heal_data": task.calibration_text,
                    **fractions,
                    "training_free": before,
                    "healed": task.value(healed),
                    "off_domain_training_free": off_before,
                    "off_domain": off(healed, original) if off else None,
                    "heal_seconds": round(report["seconds_this_run"] + blockwise.get("seconds", 0), 1),
                    "heal_tokens": report["tokens_this_run"],
                    "blockwise_tokens": blockwise.get("tokens", 0),
                    "blockwise_seconds": blockwise.get("seconds", 0),
                    "heal_tokens_per_second": report["tokens_per_second"],
                    "held_out_before": report["fidelity_before"],
                    "held_out_after": report["fidelity_after"],
                    "runtime": runtime_cost(healed_dir, quick=quick, **task.runtime_inputs),
                }
            )
            del healed
            shutil.rmtree(healed_dir, ignore_errors=True)
            tqdm.write(json.dumps(rows[-1], default=str))
    runtime_ratios(rows)
    for row in rows:
        row["date"] = time.strftime("%Y-%m-%d")
    config = task.heal.resolved(task.metric == "perplexity")
    budget = {
        "steps": config.steps,
        "batch": config.batch,
        "seq_len": config.seq_len,
        "lr": config.lr,
        "loss": {k: v for k, v in config.to_dict()["loss"].items() if v},
        "train": config.train,
        "block_steps": config.block_steps,
        "block_lr": config.block_lr,
        "block_tokens": config.block_tokens,
        "block_batch": config.block_batch,
        "data": task.calibration_text,
        "calibration_tokens": task.tokens,
    }
    return rows, budget


def merged(old: dict, new: dict) -> dict:
    """``new``'s rows replace the rows of the same model and method in ``old`` (a method's rows, every stage,
    come from one run: older rows of that method go, whatever their stage); the rest of ``old`` stays."""
    order = ["original", *(m for m, _ in METHODS)]
    fresh = {(m, r["method"]) for m, info in new["models"].items() for r in info["rows"]}
    before = [{"model": m, **info, "rows": [r for r in info["rows"] if (m, r["method"]) not in fresh]}
              for m, info in old.get("models", {}).items()]  # fmt: skip
    after = [{"model": m, **info} for m, info in new["models"].items()]
    models = {}
    for result in merge_models(before, after, key=lambda row: (row["method"], row.get("stage"))):
        result["rows"].sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        models[result.pop("model")] = result
    return {**new, "models": models, "runs": old.get("runs", []) + new["runs"],
            "seconds": old.get("seconds", 0) + new["seconds"]}  # fmt: skip


def render(payload: dict) -> str:
    parts = [f"# Healed rows ({payload['date']})", "", payload["protocol"], ""]
    for model, info in payload["models"].items():
        budget = info["budget"]
        parts += [
            f"## {model} — {info['metric']} ({info['cap']})",
            "",
            f"Heal budget, the same for every row: {budget['steps']} steps × batch {budget['batch']}"
            + (f" × {budget['seq_len']} tokens" if budget.get("seq_len") and info["metric"] == "perplexity" else "")
            + f", lr {budget['lr']}, losses {budget['loss']}, trains {budget['train']}; data {budget['data']}."
            + (f" Stage both first heals block-wise: {budget['block_steps']} steps per unit × batch "
               f"{budget['block_batch']}, lr {budget['block_lr']}, on the first {budget['block_tokens']:,} heal tokens."
               if "block_steps" in budget else ""),
            "",
            f"Off-domain: {info['off_domain']}." if info.get("off_domain") else "",
            "",
        ]  # fmt: skip
        rows = []
        columns = runtime_columns(info["rows"])  # the healed model's, in a fresh process (see the sweep's notes)
        for row in info["rows"]:
            keep = f"{row['keep_blocks']:.1%} / {row['keep']:.1%}" if row.get("keep_blocks") is not None else ""
            keep = keep or (f"all: {row['keep']:.1%}" if row.get("keep") is not None else "")
            rows.append(
                [
                    row["method"],
                    row.get("stage", ""),
                    row.get("date", ""),
                    _data_kind(row),
                    ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "",
                    keep,
                    f"{row['training_free']:.2f}",
                    f"{row['healed']:.2f}" if row["healed"] is not None else "",
                    _off(row.get("off_domain_training_free")) + " → " + _off(row.get("off_domain"))
                    if row.get("off_domain_training_free") is not None else _off(row.get("off_domain")),
                    f"{row['heal_seconds']:.0f}" if "heal_seconds" in row else "",
                    f"{row['heal_tokens_per_second']:.0f}" if "heal_tokens_per_second" in row else "",
                    *runtime_cells(row, columns),
                ]
            )
        parts.append(
            markdown_table(
                ["method", "stage", "measured", "data", "options", "kept (blocks / all)", "training-free", "healed",
                 "off-domain (free → healed)", "heal s", "e2e tokens/s",
                 *(label for _, label in columns)],
                rows,
            )  # fmt: skip
        )
        if {_data_kind(row) for row in info["rows"][1:]} - {""}:
            parts += ["", "`data`: **mix** rows calibrate and heal on the budget's mix of domains (the default); "
                      "**own** rows on the model's own domain only (older rows, or `--one-domain`)."]  # fmt: skip
        if any(not row.get("date") for row in info["rows"][1:]):
            parts += ["", "Rows with no date in `measured` are from earlier runs (heal.json's `runs`), healed end to "
                      "end only, before the block-wise stage existed."]  # fmt: skip
        if info.get("plain_finetune"):
            plain = info["plain_finetune"]
            parts += [
                "",
                f"Plain Trainer fine-tune of the original (LM loss, same batch and window), {plain['tokens']:,} "
                f"tokens: "
                f"{plain['tokens_per_second']:.0f} tokens/s.",
            ]
        parts.append("")
    return "\n".join(parts)


def _data_kind(row: dict) -> str:
    """'mix' or 'own' for a healed row (rows from before the mix have no heal_data: own domain); '' otherwise."""
    if row["method"] == "original" or row.get("healed") is None:
        return ""
    return "mix" if " + " in row.get("heal_data", "") else "own"


def _off(value) -> str:
    return "" if value is None else f"{value:.4g}"


def main() -> None:
    parser = bench_parser(__doc__, models="minilm,smollm2; --quick: minilm")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of the methods (and 'plain' for the plain fine-tune)"
    )
    parser.add_argument("--merge", action="store_true", help="replace these rows in results/heal.json, keep the rest")
    parser.add_argument("--stages", default=None, help="comma-separated subset of e2e,both (default: both stages, "
                        "each from the same fold)")  # fmt: skip
    parser.add_argument("--one-domain", action="store_true", help="calibrate and heal on each model's own domain "
                        "only (the protocol before the mix; see common.calibration_data)")  # fmt: skip
    args = parser.parse_args()
    names = (args.models or ("minilm" if args.quick else "minilm,smollm2")).split(",")
    chosen = set(args.methods.split(",")) if args.methods else None
    torch.manual_seed(0)
    start = time.perf_counter()
    payload = {
        "quick": args.quick,
        "protocol": "Each method folds the original to 50 % of its transformer-block parameters, is measured "
        "(training-free), healed by distillation from the original with the same budget, and measured again.",
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="layerfold-heal-") as tmp:
        work = Path(tmp)
        for name in names:
            task = heal_task(name, args.quick, args.one_domain)
            methods = QUICK_METHODS if args.quick else METHODS
            methods = [(m, o) for m, o in methods if chosen is None or m in chosen]
            # --quick (CI's smoke test): block-wise then end to end, once (the end-to-end-only stage is the same code)
            stages = ("both",) if args.quick else STAGES
            if args.stages:
                stages = tuple(s for s in stages if s in args.stages.split(","))
                if not stages:
                    parser.error(f"--stages: none of {args.stages!r} is e2e or both")
            rows, budget = run(task, methods, stages, args.quick, work)
            info = {"metric": task.metric, "cap": task.cap, "budget": budget, "rows": rows,
                    "off_domain": task.off_domain[0] if task.off_domain else None}  # fmt: skip
            if task.metric == "perplexity" and (chosen is None or "plain" in chosen):
                info["plain_finetune"] = plain_finetune_throughput(task, task.heal.steps, work)
            payload["models"][task.model] = info
    payload["seconds"] = round(time.perf_counter() - start)
    payload["runs"] = [
        {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "methods": args.methods or "all",
            "models": names,
            "seconds": payload["seconds"],
        }
    ]
    if args.merge and (RESULTS / "heal.json").is_file():
        payload = merged(json.loads((RESULTS / "heal.json").read_text()), payload)
    markdown = render({**payload, "date": time.strftime("%Y-%m-%d")})
    write_results("heal", payload, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
