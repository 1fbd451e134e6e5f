"""Fold the real SmolLM2-135M (30 layers) with a 30 -> 15 cycle plan at several relaxation ranks, reload each
from disk (with layerfold.load and with transformers' AutoModelForCausalLM + trust_remote_code) and compare
its next-token logits with the original's on WikiText-2 test text. At rank "full" the fold must be exact.

    python benchmarks/fold_smollm2.py [--tokens 1024] [--ranks full,64,0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import smollm2_dir, wikitext_test, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerfold
from layerfold.jobs.fold import fold_model_dir
from layerfold.jobs.settings import parse_rank
from layerfold.core.report import human_bytes, human_count, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="WikiText-2 test tokens to compare logits on")
    parser.add_argument("--ranks", default="full,64,0", help="comma-separated relaxation ranks")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(wikitext_test(), return_tensors="pt").input_ids[:, : args.tokens]
    original = layerfold.load_source(model_dir)
    with torch.no_grad():
        reference = original(ids).logits
    prompt = ids[:, :32]
    reference_tokens = original.generate(prompt, max_new_tokens=24, do_sample=False)
    # fp32 arithmetic alone moves logits: the original in fp32 against the same weights computed in float64.
    with torch.no_grad():
        reference64 = original.double()(ids).logits
    noise_floor = (reference64.float() - reference).abs().max().item()
    print(f"fp32 noise floor of the original (fp32 vs float64 forward): {noise_floor:.2e}", flush=True)
    del original

    rows, runs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for rank_text in args.ranks.split(","):
            rank = parse_rank(rank_text)
            out = Path(scratch) / f"rank-{rank_text}"
            start = time.perf_counter()
            report = fold_model_dir(model_dir, out, plan_for=lambda n: layerfold.FoldPlan.cycle(n, 15, rank=rank))
            fold_seconds = time.perf_counter() - start
            diffs = {}
            for how, loader in (
                ("layerfold.load", lambda: layerfold.load(out)),
                ("AutoModelForCausalLM", lambda: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)),
            ):
                start = time.perf_counter()
                model = loader()
                load_seconds = time.perf_counter() - start
                with torch.no_grad():
                    logits = model(ids).logits
                diffs[how] = (logits - reference).abs().max().item()
                agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            same_generation = bool(
                torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), reference_tokens)
            )
            diff64 = None
            if rank == "full":
                with torch.no_grad():
                    diff64 = (model.double()(ids).logits - reference64).abs().max().item()
            run = {
                "rank": rank,
                "plan": report["plan"],
                "before": report["before"],
                "after": report["after"],
                "max_abs_logit_diff": diffs,
                "max_abs_logit_diff_float64": diff64,
                "top1_agreement": agreement,
                "greedy_generation_identical": same_generation,
                "fold_and_save_seconds": round(fold_seconds, 1),
                "load_seconds": round(load_seconds, 1),
            }
            runs.append(run)
            print(run, flush=True)
            before, after = report["before"], report["after"]
            rows.append(
                [
                    f"cycle 30->15, rank {rank}",
                    human_count(after["parameters"]["total"]),
                    f"{after['parameters']['blocks'] / before['parameters']['blocks']:.1%}",
                    human_bytes(after["bytes_on_disk"]),
                    f"{max(diffs.values()):.2e}",
                    f"{diff64:.2e}" if diff64 is not None else "-",
                    f"{agreement:.1%}",
                    "yes" if same_generation else "no",
                    f"{fold_seconds:.0f} s",
                ]
            )
    before = runs[0]["before"]
    header = [
        "model",
        "unique params",
        "block params kept",
        "on disk",
        "max abs logit diff",
        "same in float64",
        "top-1 agreement",
        "same greedy text",
        "fold+save",
    ]
    rows.insert(
        0,
        [
            "original SmolLM2-135M",
            human_count(before["parameters"]["total"]),
            "100.0%",
            human_bytes(before["bytes_on_disk"]),
            f"{noise_floor:.2e} (fp32 vs float64)",
            "0",
            "100.0%",
            "yes",
            "-",
        ],
    )
    table = markdown_table(header, rows)
    markdown = (
        f"# Fold SmolLM2-135M, reload, compare logits\n\nWikiText-2 test, first {ids.shape[1]} tokens, one window; "
        "logits of the reloaded model (both loaders) against the original's; greedy generation of 24 tokens. "
        "'same in float64': both models run in float64 instead (rank full only). The original's row shows how far "
        "fp32 arithmetic alone moves its logits (fp32 against float64 forward): the noise floor of the comparison.\n\n"
        + table
    )
    print(markdown)
    write_results("fold_smollm2", {"tokens": ids.shape[1], "fp32_noise_floor": noise_floor, "runs": runs}, markdown)


if __name__ == "__main__":
    main()
