"""The ``layerfold`` command: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import LayerfoldError

app = typer.Typer(
    help="Make pretrained transformers smaller by sharing parameters across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Strategy(str, Enum):
    cycle = "cycle"
    sequence = "sequence"
    middle_cycle = "middle_cycle"


class Share(str, Enum):
    all = "all"
    attention = "attention"
    mlp = "mlp"


class Init(str, Enum):
    average = "average"
    stepwise = "stepwise"
    lower = "lower"


def parse_rank(text: str) -> Any:
    """``8``, ``full``, or per projection kind/name: ``attention=8,mlp=full``."""

    def one(value: str, where: str) -> Any:
        value = value.strip()
        if value == "full":
            return "full"
        if value.isdigit():
            return int(value)
        raise LayerfoldError(f"--rank: {where}must be a non-negative integer or 'full', got '{value}'")

    if "=" not in text:
        return one(text, "")
    ranks = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LayerfoldError(f"--rank: expected KIND=RANK pairs separated by commas, got '{text}'")
        ranks[key.strip()] = one(value, f"{key.strip()} ")
    return ranks


def _emit(as_json: bool, payload: dict, markdown: str) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else markdown)


def _build_plan(
    num_layers: int, plan_file: Optional[Path], strategy: Optional[Strategy], unique: Optional[int], options: dict
):
    from .plan import FoldPlan

    if plan_file is not None and strategy is not None:
        raise LayerfoldError("give either --plan or --strategy, not both")
    if plan_file is not None:
        if unique is not None:
            raise LayerfoldError("--unique goes with --strategy, not with --plan")
        plan = FoldPlan.load(plan_file)
        for key, value in options.items():
            setattr(plan, key, value)
        plan.check()
        return plan
    if strategy is None:
        raise LayerfoldError("say how to fold: --plan FILE, or --strategy cycle|sequence|middle_cycle --unique K")
    if unique is None:
        raise LayerfoldError(f"--strategy {strategy.value} needs --unique K (the number of unique blocks)")
    return getattr(FoldPlan, strategy.value)(num_layers, unique, **options)


@app.command("fold")
def fold_command(
    model_dir: Path = typer.Argument(..., help="Original model: a local Hugging Face folder or a .gguf file."),
    out: Path = typer.Option(..., "--out", help="Folder to write the folded model to."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A FoldPlan as YAML or JSON."),
    strategy: Optional[Strategy] = typer.Option(None, "--strategy", help="Tie layers by a fixed pattern."),
    unique: Optional[int] = typer.Option(None, "--unique", help="Number of unique blocks for --strategy."),
    rank: Optional[str] = typer.Option(None, "--rank", help="Relaxation rank: N, full, or attention=N,mlp=M."),
    share: Optional[Share] = typer.Option(None, "--share", help="What a tie group shares [default: all]."),
    init: Optional[Init] = typer.Option(None, "--init", help="How shared weights start [default: average]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Fold a model by tying its layers (with SVD-initialised per-layer relaxations) and save it."""
    from .api import fold_model_dir, fold_report_markdown

    options = {
        key: value
        for key, value in (
            ("rank", parse_rank(rank) if rank is not None else None),
            ("share", share.value if share else None),
            ("init", init.value if init else None),
        )
        if value is not None
    }
    report = fold_model_dir(
        model_dir,
        out,
        plan_for=lambda num_layers: _build_plan(num_layers, plan, strategy, unique, options),
        overwrite=overwrite,
    )
    _emit(as_json, report, fold_report_markdown(report))


@app.command("info")
def info_command(
    folded_dir: Path = typer.Argument(..., help="A folded model written by layerfold."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe a folded model: its plan, unique parameters and size on disk."""
    from .api import checkpoint_info, info_markdown

    info = checkpoint_info(folded_dir)
    _emit(as_json, info, info_markdown(info))


@app.command("export")
def export_command(
    folded_dir: Path = typer.Argument(..., help="A folded model written by layerfold."),
    out: Path = typer.Option(..., "--out", help="Folder for the plain Hugging Face checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a plain Hugging Face checkpoint (relaxations merged) that loads without layerfold."""
    from .io import export

    typer.echo(f"exported {export(folded_dir, out, overwrite=overwrite)}")


class Task(str, Enum):
    ppl = "ppl"
    sts = "sts"
    fidelity = "fidelity"
    size = "size"
    speed = "speed"


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A model folder (original or folded) or a .gguf file."),
    task: Task = typer.Option(..., "--task", help="What to measure."),
    data: Optional[Path] = typer.Option(None, "--data", help="Text, WikiText raw, or STS-B tsv file."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference model for --task fidelity."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on tokens read (ppl, fidelity)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Cap on pairs/sentences (sts, fidelity, speed)."),
    max_length: int = typer.Option(1024, "--max-length", help="Window length for ppl and fidelity."),
    stride: int = typer.Option(512, "--stride", help="Window stride for ppl."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure a model: perplexity, STS-B Spearman, fidelity to a reference, size, or speed."""
    from .api import evaluate_path, evaluation_markdown

    result = evaluate_path(
        model,
        task.value,
        data=data,
        reference=reference,
        max_tokens=max_tokens,
        limit=limit,
        max_length=max_length,
        stride=stride,
    )
    _emit(as_json, result, evaluation_markdown(result))


@app.command("demo")
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", help="Keep the folded model here (default: a temp dir)."),
    unique: int = typer.Option(3, "--unique", help="Unique blocks of the 6-layer model."),
    rank: int = typer.Option(8, "--rank", help="Relaxation rank."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Fold the embedded default model (all-MiniLM-L6-v2) and show what it costs and keeps."""
    from .demo import demo_markdown, run_demo

    report = run_demo(out=out, unique=unique, rank=rank, overwrite=overwrite)
    _emit(as_json, report, demo_markdown(report))


def main(argv: list[str] | None = None) -> int:
    try:
        result = app(args=argv, prog_name="layerfold", standalone_mode=False)
    except LayerfoldError as err:
        typer.echo(f"layerfold: error: {err}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("layerfold: interrupted", err=True)
        return 130
    except Exception as err:
        # Usage errors (click's, or the copy of click that newer typer vendors) explain themselves.
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help() if getattr(err, "ctx", None) else err.format_message())
            return 0
        typer.echo(f"layerfold: error: {err.format_message()}", err=True)
        return err.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
