"""Streamed folding of 1B-, 3B- and 7B-shaped fp16 checkpoints: seconds and peak resident memory.

    python benchmarks/scaling.py                    # make bench: 1b, 3b, 7b (about 25 GB of disk at the peak)
    python benchmarks/scaling.py --shapes 1b        # one shape
    python benchmarks/scaling.py --quick            # make bench-quick: a tiny Llama, its tie fold and heal

For each shape, benchmarks/make_checkpoint.py writes a random-weight fp16 checkpoint with the architecture's
exact shapes, sharded as transformers shards (5 GB files and an index), under benchmarks/.cache/. Each fold is
a separate process, ``layerfold fold --stream``, run under /usr/bin/time -v, whose "Maximum resident set size"
is the peak memory reported here:

- every shape: a cycle plan with half the blocks unique and rank-64 SVD-initialised relaxations (Relaxed
  Recursive Transformers), fp16 in and out;
- 1b also: whitened Basis Sharing (uniform ranks, 50 % of the block parameters) calibrated on WikiText-2 text,
  which walks the calibration batches through the stack one block at a time.

The checkpoints are deleted afterwards unless --keep. Writes results/scaling.{json,md} (rows: shape, method,
seconds, peak_rss_bytes) with a dated copy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, RESULTS, bench_parser, write_results
from make_checkpoint import SHAPES, make_checkpoint

from layerfold.core.texts import wikitext_half
from layerfold.core.report import markdown_table

CACHE = Path(__file__).resolve().parent / ".cache"
RANK = 64
CALIB_TOKENS = 4096
CALIB_WINDOW = 1024


# The streamed block-wise heal of the 1B-shaped tie fold: few steps (the weights are random; what is measured is
# memory and time per unit), short windows, one window per step.
HEAL_ARGS = ["--stage", "blockwise", "--stream", "--block-steps", "10", "--block-tokens", "4096", "--block-batch", "1",
             "--seq-len", "256", "--eval-examples", "2", "--train", "relax"]  # fmt: skip


def timed_fold(args: list[str], command_name: str = "fold") -> dict:
    """Run ``layerfold <command> ... --json`` under /usr/bin/time -v; its report plus wall seconds and peak RSS."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "layerfold", command_name, *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command_name} failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    report = json.loads(done.stdout)
    return {**report, "wall_seconds": round(seconds, 1), "peak_rss_bytes": int(peak.group(1)) * 1024}


def run_shape(shape: str, work: Path, keep: bool, calib_text: Path) -> list[dict]:
    checkpoint = CACHE / f"llama-{shape}-fp16"
    made = make_checkpoint(shape, checkpoint) if not (checkpoint / "config.json").is_file() else None
    layers = SHAPES[shape]["num_hidden_layers"]
    jobs = [
        (
            f"tie-cycle, {layers // 2} of {layers} blocks unique, rank {RANK}",
            ["--strategy", "cycle", "--unique", str(layers // 2), "--rank", str(RANK)],
        )
    ]
    if shape == "1b":
        jobs.append(
            (
                f"basis (whitened, uniform ranks, 50 % of blocks; {CALIB_TOKENS} calibration tokens)",
                [
                    "--method",
                    "basis",
                    "--keep-blocks",
                    "0.5",
                    "--calib",
                    str(calib_text),
                    "--calib-tokens",
                    str(CALIB_TOKENS),
                    "--calib-window",
                    str(CALIB_WINDOW),
                ],
            )
        )
    rows = []
    for method, options in jobs:
        out = work / f"{shape}-folded"
        report = timed_fold([str(checkpoint), "--out", str(out), "--stream", *options])
        row = {
            "shape": shape,
            "method": method,
            "seconds": report["wall_seconds"],
            "peak_rss_bytes": report["peak_rss_bytes"],
            "source_bytes": report["source_bytes"],
            "output_bytes": report["output_bytes"],
            "parameters": report["before"]["parameters"]["total"],
            "folded_parameters": report["after"]["parameters"]["total"],
            "shards": report["shards"],
            "units": report["units"],
            "fold_seconds": report["seconds"],
            "checkpoint_seconds": made["seconds"] if made else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        if shape in ("1b", "tiny") and method.startswith("tie-cycle"):  # tiny: --quick
            rows.append(streamed_heal(shape, method, checkpoint, out, work, calib_text))
        shutil.rmtree(out)
    if not keep:
        shutil.rmtree(checkpoint)
    return rows


def streamed_heal(shape: str, method: str, checkpoint: Path, folded: Path, work: Path, text: Path) -> dict:
    """``layerfold heal --stage blockwise --stream`` of the fold against its original, in its own process."""
    out = work / f"{shape}-healed"
    report = timed_fold([str(folded), "--teacher", str(checkpoint), "--data", str(text), "--out", str(out), *HEAL_ARGS],
                        "heal")  # fmt: skip
    blockwise = report["blockwise"]
    row = {
        "shape": shape,
        "method": f"block-wise heal, streamed, of the {method.split(',')[0]} fold ({blockwise['units']} units, "
        f"{blockwise['tokens']:,} tokens; held-out error {blockwise['held_out_before']:.3g} → "
        f"{blockwise['held_out_after']:.3g})",
        "seconds": report["wall_seconds"],
        "peak_rss_bytes": report["peak_rss_bytes"],
        "source_bytes": sum(f.stat().st_size for f in folded.glob("*.safetensors")),
        "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "parameters": None,
        "blockwise": {k: v for k, v in blockwise.items() if k != "per_unit"},
        "heal_arguments": HEAL_ARGS,
    }
    print(json.dumps(row), flush=True)
    shutil.rmtree(out)
    return row


def render(payload: dict) -> str:
    rows = payload["rows"]
    body = [
        [
            r["shape"],
            r["method"],
            f"{r['parameters'] / 1e9:.2f}B" if r.get("parameters") else "",
            f"{r['source_bytes'] / 1e9:.1f}",
            f"{r['output_bytes'] / 1e9:.1f}",
            f"{r['seconds']:.0f}",
            f"{r['seconds'] / (r['source_bytes'] / 1e9):.1f}",
            f"{r['peak_rss_bytes'] / 1e9:.2f}",
            r.get("date", ""),
        ]
        for r in rows
    ]
    return "\n".join(
        [
            f"# Streamed folding of large checkpoints ({payload['date']})",
            "",
            "Random-weight fp16 Llama checkpoints with real architectures' shapes (benchmarks/make_checkpoint.py), "
            "sharded in 5 GB files; each fold is its own `layerfold fold --stream` process under `/usr/bin/time -v` "
            "(peak = its maximum resident set size). Seconds are wall-clock for the whole command.",
            "",
            markdown_table(
                [
                    "shape",
                    "method",
                    "parameters",
                    "source GB",
                    "output GB",
                    "seconds",
                    "s per source GB",
                    "peak RSS GB",
                    "measured",
                ],
                body,
            ),
            "",
        ]
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--shapes", default=None, help="comma-separated (default 1b,3b,7b; --quick: tiny, four "
                        "small Llama blocks)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints in benchmarks/.cache")
    args = parser.parse_args()
    rows = []
    start = time.perf_counter()
    CACHE.mkdir(exist_ok=True)
    # On the same disk as the checkpoints (several GB), inside the ignored cache folder.
    with tempfile.TemporaryDirectory(prefix="scaling-", dir=CACHE) as tmp:
        calib_text = Path(tmp) / "wikitext-test-first-half.txt"
        calib_text.write_text(wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "first"))
        for shape in (args.shapes or ("tiny" if args.quick else "1b,3b,7b")).split(","):
            rows += run_shape(shape, Path(tmp), args.keep, calib_text)
    for row in rows:
        row["date"] = time.strftime("%Y-%m-%d")
    earlier = RESULTS / "scaling.json"
    if earlier.is_file() and not args.quick:  # rows of shapes not run this time stay, with the date they were measured
        measured = {r["shape"] for r in rows}
        old = json.loads(earlier.read_text())
        rows += [{"date": old.get("date", "")[:10], **r} for r in old["rows"] if r["shape"] not in measured]
    payload = {"rows": rows, "seconds": round(time.perf_counter() - start), "date": time.strftime("%Y-%m-%d")}
    markdown = render(payload)
    write_results("scaling", payload, markdown, quick=args.quick)
    print(markdown)


if __name__ == "__main__":
    main()
