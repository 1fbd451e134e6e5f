"""The ``layerfold`` command: one subcommand per job, its options generated from the job's settings dataclass
(``cli.generate``), its report printed on stdout (``--json``: its ``to_dict()``; else its ``markdown()``).

A command's settings (and with them torch) load only when that command runs or shows its help, so that
``layerfold --help`` and ``--version`` start at once; the list below is what ``--help`` shows without them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pkgutil import resolve_name as _named  # "module:name" -> the object
from typing import Any, Callable

import typer

from ..core.errors import LayerfoldError
from ..core.quiet import quietly
from .entry import stop

app = typer.Typer(
    help="Make pretrained transformers smaller by sharing parameters across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class Command:
    """A subcommand: the job it runs (``module:function``, taking the settings and returning a report), its
    settings dataclass, and what the command changes of the shared options' metadata."""

    summary: str  # the line ``layerfold --help`` shows (the settings' docstring once loaded)
    job: str
    settings: str
    changes: dict = field(default_factory=dict)
    extra: Callable[[], dict] | None = None  # more options, with their parsers (fold's method flags)
    leave_out: tuple[str, ...] = ()  # fields of the report that --json leaves out


def _method_flags() -> dict[str, tuple[inspect.Parameter, Callable[[Any], Any]]]:
    """Every registered method's options as ``fold`` flags, each with its parser; the tie options' flags are
    fold's own (``TieSettings``) and reach the tie methods."""
    from ..core.settings import options_of
    from ..jobs.settings import TieSettings
    from ..methods import registry

    own = {flag.name for flag in options_of(TieSettings)}
    found = {}
    for name, (annotation, text, parse) in registry.option_flags().items():
        if name not in own:
            option = typer.Option(None, "--" + name.replace("_", "-"), help=text.replace("%", "%%"))
            found[name] = (inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation), parse)
    return found


DATA = {"required": True}
COMMANDS = {
    "fold": Command("Fold a model and save it: by a plan or tying strategy, or by a method at a parameter budget.",
                    "layerfold.jobs.fold:run_fold", "layerfold.jobs.settings:FoldSettings",
                    {"out": {"help": "Folder to write the folded model to."}, "data": {"flag": "--calib"}},
                    extra=_method_flags),
    "info": Command("Describe a model folder: whether it needs layerfold to load, its plan, parameters and size.",
                    "layerfold.jobs.info:run_info", "layerfold.jobs.settings:InfoSettings"),
    "export": Command("Write a plain Hugging Face checkpoint (relaxations merged) that loads without layerfold.",
                      "layerfold.jobs.export:run_export", "layerfold.jobs.settings:ExportSettings",
                      {"out": {"help": "Folder for the plain Hugging Face checkpoint."}}),
    "eval": Command("Measure a model: perplexity, STS-B, fidelity, size, speed, or lm-eval accuracy.",
                    "layerfold.jobs.evaluate:run_evaluate", "layerfold.jobs.settings:EvalSettings"),
    "heal": Command("Heal a folded model by distillation from its original (HF Trainer; runs under accelerate).",
                    "layerfold.jobs.heal:run_heal", "layerfold.jobs.heal:HealSettings",
                    {"out": {"help": "Folder to write the healed model to."}}, leave_out=("log_history",)),
    "analyze": Command("Measure where a model is redundant: Block Influence, similarities, gradients, gates.",
                       "layerfold.jobs.compress:run_analyze", "layerfold.jobs.settings:AnalyzeSettings",
                       {"out": {"help": "Folder for analysis.json, analysis.md and the heat-maps."}, "data": DATA}),
    "plan": Command("Search the fold plans within a budget and write the best one.",
                    "layerfold.jobs.compress:run_plan", "layerfold.jobs.settings:PlanSettings",
                    {"out": {"help": "The plan file to write (.yaml or .json); the reasons go beside it (.md)."},
                     "data": DATA}),
    "compress": Command("Analyse, plan, fold, heal (optional) and evaluate in one command.",
                        "layerfold.jobs.compress:run_compress", "layerfold.jobs.settings:CompressSettings",
                        {"out": {"help": "Folder to write the compressed model and its reports to."},
                         "data": {**DATA, "help": "Text for calibration and healing (plain, STS-B, .jsonl, datasets). "
                                  "Repeat to mix domains: each file gives an equal share of the tokens."}}),
    "demo": Command("Compress the embedded default model (all-MiniLM-L6-v2) with pydoc text and show the cost.",
                    "layerfold.jobs.demo:run_demo_command", "layerfold.jobs.settings:DemoSettings"),
}  # fmt: skip


def _runner(name: str) -> Callable[..., None]:
    def run(**values: Any) -> None:
        from .generate import settings_from

        command = COMMANDS[name]
        as_json = bool(values.get("json"))
        extra = {key: values.pop(key) for key in list(values) if key in _EXTRA.get(name, {})}
        settings = settings_from(_named(command.settings), values, command.changes)
        if extra:  # fold's method flags: the method's own options
            settings.method_options = {k: _EXTRA[name][k][1](v) for k, v in extra.items() if v is not None}
        # Trainer (heal, the block gates, analysed methods) prints on stdout: keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            report = _named(command.job)(settings)
        if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, the first process reports
            if as_json:
                shown = {k: v for k, v in report.to_dict().items() if k not in command.leave_out}
                typer.echo(json.dumps(shown, indent=2, default=str))
            else:
                typer.echo(report.markdown())

    run.__doc__ = COMMANDS[name].summary
    return run


_EXTRA: dict[str, dict[str, tuple[inspect.Parameter, Callable[[Any], Any]]]] = {}
RUNNERS = {name: _runner(name) for name in COMMANDS}
for _name, _run in RUNNERS.items():
    app.command(_name)(_run)


def load_command(name: str) -> None:
    """Give a command its generated options and full help (its settings' docstring) before it runs."""
    from .generate import signature

    command = COMMANDS[name]
    settings = _named(command.settings)
    extra = command.extra() if command.extra else {}
    _EXTRA[name] = extra
    RUNNERS[name].__signature__ = signature(settings, command.changes, [p for p, _ in extra.values()])
    RUNNERS[name].__doc__ = inspect.getdoc(settings)


def _print_version(value: bool) -> None:
    if value:
        import layerfold

        typer.echo(f"layerfold {layerfold.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print layerfold's version and exit."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bars, notes or library warnings on stderr; errors still show."
    ),
) -> None:
    """Make pretrained transformers smaller by sharing parameters across layers."""
    # --quiet is acted on by main, which must silence stderr before the app starts.


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        command_at = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
        if command_at < len(args) and args[command_at] in COMMANDS:
            load_command(args[command_at])
        with quietly(any(a in ("--quiet", "-q") for a in args[:command_at])):
            result = app(args=args, prog_name="layerfold", standalone_mode=False)
    except LayerfoldError as err:
        typer.echo(f"layerfold: error: {err}", err=True)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        line, code = stop()
        typer.echo(line, err=True)
        return code
    except Exception as err:
        # Usage errors (click's, or the copy of click that newer typer vendors) explain themselves.
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":
            typer.echo(err.ctx.get_help() if getattr(err, "ctx", None) else err.format_message())
            return 0
        typer.echo(f"layerfold: error: {err.format_message()}", err=True)
        return err.exit_code
    if result == 130:  # typer (standalone_mode=False) turns a Ctrl-C (or SIGTERM) inside a command into this code
        line, result = stop()
        typer.echo(line, err=True)
    return result if isinstance(result, int) else 0
