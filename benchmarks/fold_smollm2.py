"""Fold the real SmolLM2-135M (30 layers) with a 30 -> 15 cycle plan at several relaxation ranks, reload each
from disk (with layerfold.load and with transformers' AutoModelForCausalLM + trust_remote_code) and compare
its next-token logits with the original's on WikiText-2 test text. At rank "full" the fold must be exact.

    python benchmarks/fold_smollm2.py [--tokens 1024] [--ranks full,64,0]
    python benchmarks/fold_smollm2.py --quick    # make bench-quick: 128 tokens, rank 0
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import bench_parser, smollm2_dir, wikitext_test, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerfold
from layerfold.jobs.fold import fold_model_dir
from layerfold.jobs.settings import parse_rank
from layerfold.core.report import human_bytes, human_count, markdown_table


def fold_and_compare(model_dir: Path, rank, out: Path, ids, prompt, reference, reference64, reference_tokens) -> dict:
    """Fold SmolLM2 30 -> 15 at ``rank``, reload it with both loaders, and compare logits and greedy text."""
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
    same_generation = bool(torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), reference_tokens))
    diff64 = None
    if rank == "full":
        with torch.no_grad():
            diff64 = (model.double()(ids).logits - reference64).abs().max().item()
    return {
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


def render(runs: list[dict], tokens: int, noise_floor: float) -> str:
    before = runs[0]["before"]
    rows = [["original SmolLM2-135M", human_count(before["parameters"]["total"]), "100.0%",
             human_bytes(before["bytes_on_disk"]), f"{noise_floor:.2e} (fp32 vs float64)", "0", "100.0%", "yes", "-"]]
    for run in runs:
        after, diff64 = run["after"], run["max_abs_logit_diff_float64"]
        rows.append([f"cycle 30->15, rank {run['rank']}", human_count(after["parameters"]["total"]),
                     f"{after['parameters']['blocks'] / before['parameters']['blocks']:.1%}",
                     human_bytes(after["bytes_on_disk"]), f"{max(run['max_abs_logit_diff'].values()):.2e}",
                     f"{diff64:.2e}" if diff64 is not None else "-", f"{run['top1_agreement']:.1%}",
                     "yes" if run["greedy_generation_identical"] else "no", f"{run['fold_and_save_seconds']:.0f} s"])
    header = ["model", "unique params", "block params kept", "on disk", "max abs logit diff", "same in float64",
              "top-1 agreement", "same greedy text", "fold+save"]
    return (
        f"# Fold SmolLM2-135M, reload, compare logits\n\nWikiText-2 test, first {tokens} tokens, one window; "
        "logits of the reloaded model (both loaders) against the original's; greedy generation of 24 tokens. "
        "'same in float64': both models run in float64 instead (rank full only). The original's row shows how far "
        "fp32 arithmetic alone moves its logits (fp32 against float64 forward): the noise floor of the comparison.\n\n"
        + markdown_table(header, rows)
    )  # fmt: skip


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=None, help="WikiText-2 test tokens to compare logits on "
                        "(default 1,024; --quick: 128)")  # fmt: skip
    parser.add_argument("--ranks", default=None, help="comma-separated relaxation ranks (default full,64,0; "
                        "--quick: 0)")  # fmt: skip
    args = parser.parse_args()
    tokens = args.tokens or (128 if args.quick else 1024)
    ranks = args.ranks or ("0" if args.quick else "full,64,0")

    torch.manual_seed(0)
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(wikitext_test(), return_tensors="pt").input_ids[:, :tokens]
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

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for rank_text in ranks.split(","):
            out = Path(scratch) / f"rank-{rank_text}"
            runs.append(fold_and_compare(model_dir, parse_rank(rank_text), out, ids, prompt, reference, reference64,
                                         reference_tokens))  # fmt: skip
            print(runs[-1], flush=True)
    markdown = render(runs, ids.shape[1], noise_floor)
    print(markdown)
    write_results("fold_smollm2", {"tokens": ids.shape[1], "fp32_noise_floor": noise_floor, "runs": runs}, markdown,
                  quick=args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
