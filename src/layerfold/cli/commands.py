"""The ``layerfold`` command: a thin layer over the Python API."""

from __future__ import annotations

import contextlib
import inspect
import json
import types
import typing
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .entry import stop
from ..core.texts import single_source
from ..core.errors import LayerfoldError
from ..evaluation.tasks import TASKS

app = typer.Typer(
    help="Make pretrained transformers smaller by sharing parameters across layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
MIX_HELP = " Repeat to mix domains: each file gives an equal share of the tokens."


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


class _QuietStderr:
    """stderr while --quiet: nothing is written until the app returns (``main`` prints errors afterwards)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class Strategy(str, Enum):
    cycle = "cycle"
    sequence = "sequence"
    middle_cycle = "middle_cycle"


class Share(str, Enum):
    all = "all"
    attention = "attention"
    mlp = "mlp"


class Fit(str, Enum):
    average = "average"
    stepwise = "stepwise"
    lower = "lower"
    lstsq = "lstsq"


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


def _list(text: Optional[str], kind: type, option: str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise LayerfoldError(f"{option}: expected a comma-separated list, got '{text}'") from None


def _emit(as_json: bool, report, leave_out: tuple[str, ...] = ()) -> None:
    """A job's report on stdout: its JSON (without ``leave_out``) or its Markdown."""
    if as_json:
        typer.echo(json.dumps({k: v for k, v in report.to_dict().items() if k not in leave_out}, indent=2, default=str))
    else:
        typer.echo(report.markdown())


def _build_plan(
    num_layers: int, plan_file: Optional[Path], strategy: Optional[Strategy], unique: Optional[int], options: dict
):
    from ..operations.plan import FoldPlan

    if plan_file is not None and strategy is not None:
        raise LayerfoldError("give either --plan or --strategy, not both")
    if plan_file is not None:
        if unique is not None:
            raise LayerfoldError("--unique goes with --strategy, not with --plan")
        plan = FoldPlan.load(plan_file)
        plan.set_tie_options(**options)
        plan.check()
        return plan
    if strategy is None:
        raise LayerfoldError("say how to fold: --plan FILE, or --strategy cycle|sequence|middle_cycle --unique K")
    if unique is None:
        raise LayerfoldError(f"--strategy {strategy.value} needs --unique K (the number of unique blocks)")
    return getattr(FoldPlan, strategy.value)(num_layers, unique, **options)


# Over 80 lines: most are the command's own flags (the methods' flags are added by ``_fold_signature``).
def _fold(
    model_dir: Path = typer.Argument(..., help="Original model: a local Hugging Face folder or a .gguf file."),
    out: Path = typer.Option(..., "--out", help="Folder to write the folded model to."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A FoldPlan as YAML or JSON."),
    strategy: Optional[Strategy] = typer.Option(None, "--strategy", help="Tie layers by a fixed pattern."),
    unique: Optional[int] = typer.Option(None, "--unique", help="Number of unique blocks for --strategy."),
    rank: Optional[str] = typer.Option(None, "--rank", help="Relaxation rank: N, full, or attention=N,mlp=M."),
    share: Optional[Share] = typer.Option(None, "--share", help="What a tie group shares [default: all]."),
    fit: Optional[Fit] = typer.Option(
        None,
        "--fit",
        "--init",
        help="How a tie's shared weights are fitted: the average of its layers, one layer each (lower, stepwise), "
        "or least squares on the calibration inputs (lstsq, needs --calib) [default: average].",
    ),
    whiten: Optional[bool] = typer.Option(
        None,
        "--whiten/--no-whiten",
        help="Truncate tie relaxations in the space whitened by each layer's calibration inputs [default: on with "
        "--calib and a rank].",
    ),
    relax: Optional[str] = typer.Option(
        None,
        "--relax",
        help="The tie relaxations' form: lora (private factors), vera (shared frozen random bases, two vectors per "
        "layer), svfit (a fixed SVD whose singular values train), mos (pools of vectors each group shares; "
        "each layer reads --rank of each by its index maps) or kronecker (Compacter: shared slow matrices (x) "
        "each layer's fast factors of rank --rank) "
        "[default: lora].",
    ),
    private: Optional[int] = typer.Option(
        None, "--private", min=0, help="With --relax mos: each layer's private LoRA rank beside the pool [default: 0]."
    ),
    mos_pool: Optional[int] = typer.Option(
        None, "--mos-pool", min=1, help="With --relax mos: the vectors each of a group's two pools holds, at least --rank "
        "[default: --rank, the whole pool]."
    ),
    mos_shard: Optional[int] = typer.Option(
        None, "--mos-shard", min=1, help="With --relax mos: the vectors in one shard, the unit an index map picks (it must "
        "divide --rank and --mos-pool) [default: 1]."
    ),
    kron_factor: Optional[int] = typer.Option(
        None, "--kron-factor", min=1, help="With --relax kronecker: the shared slow matrices' size n (n x n; it must divide "
        "both sides of every shared projection) [default: 4]."
    ),
    kron_terms: Optional[int] = typer.Option(
        None, "--kron-terms", min=1, help="With --relax kronecker: how many slow matrices each tie group shares, 1 to n² "
        "(with n² and --rank full the relaxation is exact) [default: n]."
    ),
    method: Optional[str] = typer.Option(
        None, "--method", help="Fold at a budget with a registered method (listed by layerfold fold --help)."
    ),
    keep: Optional[float] = typer.Option(None, "--keep", help="Fraction of all unique parameters to keep."),
    keep_blocks: Optional[float] = typer.Option(
        None, "--keep-blocks", help="Fraction of the transformer-block parameters to keep (embeddings not counted)."
    ),
    calib: Optional[list[Path]] = typer.Option(
        None, "--calib", help="Calibration text: plain, WikiText, STS-B, .jsonl or a datasets folder." + MIX_HELP
    ),
    calib_tokens: int = typer.Option(65536, "--calib-tokens", help="Calibration tokens to use."),
    calib_window: Optional[int] = typer.Option(
        None, "--calib-window", help="Tokens per calibration window [default: 2048 decoders, 128 encoders]."
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Fold a safetensors checkpoint folder a group of tensors at a time, without loading it "
        "(for models larger than memory).",
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest output weight file; bigger models are written in shards."
    ),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Save the folded weights as fp32, fp16 or bf16 [default: as the original loads]."
    ),
    sequential: bool = typer.Option(
        False,
        "--sequential/--no-sequential",
        help="Refit what the plan fits to calibration data on the inputs the folded layers before it produce "
        "[default: off; a streamed fold fits to the original's inputs].",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    method_flags: Optional[dict] = None,
) -> None:
    """Fold a model and save it: by a plan or tying strategy, or by a method at a parameter budget."""
    from ..jobs.fold import dtype_of, fold_model_dir, fold_streamed, fold_with_method
    from ..core.tensor_files import parse_size
    from ..checkpoints.output_guard import check_output

    calib = single_source(calib)
    dtype_of(dtype)  # a bad value fails before anything loads
    if dtype is not None and stream:
        raise LayerfoldError("--dtype does not go with --stream (a streamed fold keeps the checkpoint's dtype)")
    if sequential and stream:
        raise LayerfoldError("--sequential does not go with --stream (a streamed fold fits to the original's inputs)")

    check_output(out, {"original model": model_dir, "plan": plan, "calibration text": calib}, overwrite=overwrite)
    max_shard_bytes = parse_size(max_shard_size)

    method_options = _method_options(method_flags or {})
    plan_options = {
        key: value
        for key, value in (
            ("rank", parse_rank(rank) if rank is not None else None),
            ("share", share.value if share else None),
            ("fit", fit.value if fit else None),
            ("whiten", whiten),
            ("relax", relax),
            ("private", private),
            ("mos_pool", mos_pool),
            ("mos_shard", mos_shard),
            ("kron_factor", kron_factor),
            ("kron_terms", kron_terms),
        )
        if value is not None
    }
    budget_options = dict(
        method=method,
        keep=keep,
        keep_blocks=keep_blocks,
        calib=calib,
        calib_tokens=calib_tokens,
        calib_window=calib_window,
    )

    if strategy is not None and calib is not None and "whiten" not in plan_options:
        from ..methods.tying import whitens_by_default

        plan_options["whiten"] = whitens_by_default(plan_options.get("rank", 0), calibrated=True)

    def plan_for(num_layers: int):
        return _build_plan(num_layers, plan, strategy, unique, plan_options)

    if method is not None and (plan is not None or strategy is not None or unique is not None):
        raise LayerfoldError("--method folds at a budget; it does not go with --plan, --strategy or --unique")
    if stream:
        if method is None and (method_options or keep is not None or keep_blocks is not None):
            raise LayerfoldError("--keep and the method options need --method")
        report = fold_streamed(
            model_dir,
            out,
            plan_for=None if method is not None else plan_for,
            **budget_options,
            options={**method_options, **plan_options},
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
        )
    elif method is not None:
        with contextlib.redirect_stdout(sys.stderr):  # Trainer (an analysed method's gates) prints on stdout
            report = fold_with_method(
                model_dir,
                out,
                **budget_options,
                options={**method_options, **plan_options},
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes,
                dtype=dtype,
                sequential=sequential,
            )
    else:
        if method_options or keep is not None or keep_blocks is not None:
            raise LayerfoldError("--keep and the method options need --method")
        report = fold_model_dir(
            model_dir,
            out,
            plan_for=plan_for,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            dtype=dtype,
            calib=calib,
            calib_tokens=calib_tokens,
            calib_window=calib_window,
            sequential=sequential,
        )
    _emit(as_json, report)


# ---- fold's method flags, generated from the registered methods' options ------------------------------------
# --rank, --share, --fit, --whiten, --relax, --private, --mos-* and --kron-* are fold's own flags (they serve
# --strategy too) and reach the tie methods.
# The registry imports torch (seconds), so the flags are generated only when the fold command runs or shows its
# help (``main`` asks for them); ``layerfold --help`` and the other commands start without them.
_OWN_FLAGS = ("rank", "share", "fit", "whiten", "relax", "private", "mos_pool", "mos_shard", "kron_factor",
              "kron_terms")
METHOD_FLAGS: dict[str, dict] = {}


def _load_method_flags() -> None:
    from ..methods import registry

    if not METHOD_FLAGS:
        METHOD_FLAGS.update({n: i for n, i in registry.all_options().items() if n not in _OWN_FLAGS})
        fold_command.__signature__ = _fold_signature(registry)


def _flag_type(kind: Any) -> tuple[Any, Any]:
    """(the annotation typer sees, the element type of a comma-separated list or None)."""
    present = [k for k in typing.get_args(kind) if k is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(present) == 1:
        kind = present[0]  # Optional[X]
    if typing.get_origin(kind) in (list, tuple):
        return Optional[str], typing.get_args(kind)[0]
    return Optional[kind], None


def _method_options(flags: dict) -> dict:
    options = {}
    for name, value in flags.items():
        if value is None:
            continue
        _, element = _flag_type(METHOD_FLAGS[name]["type"])
        options[name] = _list(value, element, "--" + name.replace("_", "-")) if element is not None else value
    return options


def fold_command(**values: Any) -> None:
    flags = {name: values.pop(name) for name in METHOD_FLAGS if name in values}
    _fold(**values, method_flags=flags)


def _fold_signature(registry=None) -> inspect.Signature:
    """fold's own flags, and with the ``registry`` every method's options (and the list of methods)."""
    own = [p for p in inspect.signature(_fold, eval_str=True).parameters.values() if p.name != "method_flags"]
    if registry is not None:
        text = f"Fold at a budget with a method: {', '.join(registry.REGISTRY)}."
        own = [p.replace(default=typer.Option(None, "--method", help=text)) if p.name == "method" else p for p in own]
    generated = []
    for name, info in METHOD_FLAGS.items():
        annotation, _ = _flag_type(info["type"])
        text = " ".join(f"{', '.join(names)}: {help}" for help, names in info["helps"].items()).replace("%", "%%")
        option = typer.Option(None, "--" + name.replace("_", "-"), help=text)
        generated.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return inspect.Signature(own + generated)


fold_command.__signature__ = _fold_signature()
fold_command.__doc__ = _fold.__doc__
app.command("fold")(fold_command)


@app.command("info")
def info_command(
    folded_dir: Path = typer.Argument(..., help="A model folder: folded by layerfold, exported, or an original."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe a model folder: whether it needs layerfold to load and why, its plan, unique parameters and size
    on disk."""
    from ..jobs.info import checkpoint_info

    info = checkpoint_info(folded_dir)
    _emit(as_json, info)


@app.command("export")
def export_command(
    folded_dir: Path = typer.Argument(..., help="A folded model written by layerfold."),
    out: Path = typer.Option(..., "--out", help="Folder for the plain Hugging Face checkpoint."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights as fp32, fp16 or bf16 [default: as stored]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a plain Hugging Face checkpoint (relaxations merged) that loads without layerfold."""
    from ..jobs.export import export_model_dir

    _emit(as_json, export_model_dir(folded_dir, out, dtype=dtype, overwrite=overwrite))


Task = Enum("Task", {name: name for name in TASKS}, type=str)  # the registered measurements


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A model folder (original or folded) or a .gguf file."),
    task: Task = typer.Option(
        ..., "--task", help="What to measure: " + "; ".join(f"{t.name}, {t.summary}" for t in TASKS.values()) + "."
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Text, WikiText raw, or STS-B tsv file; for lm-eval a GLUE-layout folder."
    ),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="lm-eval tasks, comma-separated: glue_sst2_dev, glue_rte_dev [default: both]."
    ),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference model for --task fidelity."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on tokens read (ppl, fidelity)."),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Cap on pairs/sentences (sts, fidelity, speed) or examples per task (lm-eval)."
    ),
    max_length: int = typer.Option(1024, "--max-length", help="Window length for ppl and fidelity."),
    stride: int = typer.Option(512, "--stride", help="Window stride for ppl."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure a model: perplexity, STS-B Spearman, fidelity to a reference, size, speed, or zero-shot accuracy
    on local lm-evaluation-harness tasks."""
    from ..jobs.evaluate import evaluate_path

    result = evaluate_path(
        model,
        task.value,
        data=data,
        tasks=tasks,
        reference=reference,
        max_tokens=max_tokens,
        limit=limit,
        max_length=max_length,
        stride=stride,
    )
    _emit(as_json, result)


class Train(str, Enum):
    relax = "relax"
    relax_shared = "relax+shared"
    all = "all"


class Stage(str, Enum):
    blockwise = "blockwise"
    e2e = "e2e"
    both = "both"


# Over 80 lines: its 33 options, one typer declaration each (to be generated from HealConfig).
@app.command("heal")
def heal_command(
    folded_dir: Path = typer.Argument(..., help="A folded model (layerfold checkpoint)."),
    teacher: Path = typer.Option(..., "--teacher", help="The original model: a Hugging Face folder or .gguf file."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Text, .jsonl, STS-B file, or a datasets folder (save_to_disk)." + MIX_HELP
    ),
    out: Path = typer.Option(..., "--out", help="Folder to write the healed model to."),
    steps: int = typer.Option(200, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (cosine schedule, 5% warm-up)."),
    batch: int = typer.Option(8, "--batch", help="Examples per step and device."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation steps."),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", help="Tokens per example [default: 512-token windows for decoders, 128 for encoders]."
    ),
    loss: Optional[str] = typer.Option(
        None,
        "--loss",
        help="Loss weights, e.g. kl=1,hidden=0.5 (kl, lm, hidden, cosine) [default: kl for "
        "decoders; cosine=1,hidden=1 for encoders].",
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="Temperature of the kl loss."),
    hidden_layers: str = typer.Option("-1", "--hidden-layers", help="Layers for the hidden loss, e.g. -1,-2,-3."),
    train: Train = typer.Option(Train.all, "--train", help="What trains."),
    norms: Optional[bool] = typer.Option(
        None, "--norms/--no-norms", help="Train the norm weights [default: with --train all only]."
    ),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Held-out fidelity every N steps."),
    eval_examples: Optional[int] = typer.Option(None, "--eval-examples", help="Held-out windows or sentences."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Use at most N training examples."),
    seed: int = typer.Option(0, "--seed"),
    teacher_cache: Optional[Path] = typer.Option(
        None, "--teacher-cache", help="Folder for the teacher's top-k logits, reused by later runs (kl loss only)."
    ),
    top_k: int = typer.Option(64, "--top-k", help="Logits per token kept in --teacher-cache."),
    stage: Stage = typer.Option(
        Stage.both,
        "--stage",
        help="blockwise: train each folded unit to reproduce the original's outputs on cached inputs; e2e: "
        "distillation through the whole model; both: block-wise first.",
    ),
    block_steps: int = typer.Option(100, "--block-steps", help="Block-wise steps per unit."),
    block_lr: float = typer.Option(1e-3, "--block-lr", help="Block-wise peak learning rate."),
    block_tokens: int = typer.Option(32768, "--block-tokens", help="Training tokens the block-wise stage uses."),
    block_kl: float = typer.Option(
        0.0, "--block-kl", help="Decoders: weight of a KL term through the head for the unit with the last layer."
    ),
    block_batch: Optional[int] = typer.Option(
        None, "--block-batch", help="Block-wise examples per step [default: 4 windows; 32 sentences]."
    ),
    unit_memory: str = typer.Option(
        "2GB", "--unit-memory", help="Memory bound of one block-wise unit (weights, gradients, optimizer state)."
    ),
    shared_lr: Optional[float] = typer.Option(
        None, "--shared-lr", help="End-to-end learning rate of the shared tensors [default: --lr]."
    ),
    stream: bool = typer.Option(
        False, "--stream", help="Block-wise heal from the checkpoints' shards, one unit in memory (--stage blockwise)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.checkpoints."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep OUT.checkpoints at the end."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out and earlier checkpoints."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Heal a folded model by distillation from its original (HF Trainer; runs under accelerate launch)."""
    from ..core.tensor_files import parse_size
    from ..heal import HealConfig, LossWeights, heal, heal_streamed

    data = single_source(data)
    config = HealConfig(
        steps=steps,
        lr=lr,
        batch=batch,
        grad_accum=grad_accum,
        seq_len=seq_len,
        loss=LossWeights.parse(loss) if loss is not None else None,
        temperature=temperature,
        hidden_layers=_list(hidden_layers, int, "--hidden-layers") or [-1],
        train=train.value,
        norms=norms,
        eval_every=eval_every,
        eval_examples=eval_examples,
        save_every=save_every,
        max_examples=max_examples,
        seed=seed,
        teacher_cache=str(teacher_cache) if teacher_cache else None,
        top_k=top_k,
        stage=stage.value,
        block_steps=block_steps,
        block_lr=block_lr,
        block_tokens=block_tokens,
        block_batch=block_batch,
        block_kl=block_kl,
        unit_memory=parse_size(unit_memory, "--unit-memory"),
        shared_lr=shared_lr,
    )
    # Trainer prints its progress and logs on stdout; keep stdout for the report (e.g. --json).
    with contextlib.redirect_stdout(sys.stderr):
        report = (heal_streamed if stream else heal)(
            folded_dir,
            teacher,
            data,
            out,
            config,
            resume=resume,
            overwrite=overwrite,
            keep_checkpoints=keep_checkpoints,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        _emit(as_json, report, leave_out=("log_history",))


@app.command("analyze")
def analyze_command(
    model_dir: Path = typer.Argument(..., help="Original model: a local Hugging Face folder or a .gguf file."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Calibration text: plain, WikiText, STS-B, .jsonl or a datasets folder." + MIX_HELP
    ),
    out: Path = typer.Option(..., "--out", help="Folder for analysis.json, analysis.md and the heat-maps."),
    calib_tokens: int = typer.Option(32768, "--calib-tokens", help="Calibration tokens to use."),
    gate_steps: int = typer.Option(20, "--gate-steps", help="Steps to train the block gates (0: no gates)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON."),
) -> None:
    """Measure where a model is redundant: Block Influence, layer similarity, weight similarity, gradients, gates."""
    from ..jobs.compress import analyze_model_dir

    data = single_source(data)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer (the gates) prints on stdout
        report = analyze_model_dir(
            model_dir, data, out, tokens=calib_tokens, gate_steps=gate_steps, overwrite=overwrite
        )
    _emit(as_json, report)


@app.command("plan")
def plan_command(
    model_dir: Path = typer.Argument(..., help="Original model: a local Hugging Face folder or a .gguf file."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Calibration text: plain, WikiText, STS-B, .jsonl or a datasets folder." + MIX_HELP
    ),
    out: Path = typer.Option(
        ..., "--out", help="The plan file to write (.yaml or .json); the reasons go beside it (.md)."
    ),
    keep: Optional[float] = typer.Option(None, "--keep", help="Fraction of all unique parameters to keep."),
    keep_blocks: Optional[float] = typer.Option(
        None, "--keep-blocks", help="Fraction of the transformer-block parameters to keep."
    ),
    allow: str = typer.Option("drop,tie,basis,lora,width", "--allow", help="What the plan may use: drop, tie, basis, lora, width."),
    calib_tokens: int = typer.Option(32768, "--calib-tokens", help="Calibration tokens to use."),
    gate_steps: int = typer.Option(20, "--gate-steps", help="Steps to train the block gates (0: no gates)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the search as JSON."),
) -> None:
    """Search the fold plans within a budget and write the best one, with the proxy values of the best few."""
    from ..jobs.compress import plan_model_dir

    data = single_source(data)
    with contextlib.redirect_stdout(sys.stderr):
        report = plan_model_dir(
            model_dir,
            data,
            out,
            keep=keep,
            keep_blocks=keep_blocks,
            allow=allow,
            tokens=calib_tokens,
            gate_steps=gate_steps,
            overwrite=overwrite,
        )
    _emit(as_json, report)


@app.command("compress")
def compress_command(
    model_dir: Path = typer.Argument(..., help="Original model: a local Hugging Face folder or a .gguf file."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Text for calibration and healing (plain, STS-B, .jsonl, datasets)." + MIX_HELP
    ),
    out: Path = typer.Option(..., "--out", help="Folder to write the compressed model and its reports to."),
    keep: Optional[float] = typer.Option(None, "--keep", help="Fraction of all unique parameters to keep."),
    keep_blocks: Optional[float] = typer.Option(
        None, "--keep-blocks", help="Fraction of the transformer-block parameters to keep."
    ),
    allow: str = typer.Option("drop,tie,basis,lora,width", "--allow", help="What the plan may use: drop, tie, basis, lora, width."),
    heal_steps: int = typer.Option(0, "--heal-steps", help="Distillation steps after folding (0: no healing)."),
    calib_tokens: int = typer.Option(32768, "--calib-tokens", help="Calibration tokens to use."),
    gate_steps: int = typer.Option(20, "--gate-steps", help="Steps to train the block gates (0: no gates)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Analyse, plan, fold, heal (optional) and evaluate in one command."""
    from ..jobs.compress import compress_model_dir

    data = single_source(data)
    with contextlib.redirect_stdout(sys.stderr):
        report = compress_model_dir(
            model_dir,
            data,
            out,
            keep=keep,
            keep_blocks=keep_blocks,
            allow=allow,
            tokens=calib_tokens,
            gate_steps=gate_steps,
            heal_steps=heal_steps,
            overwrite=overwrite,
        )
    _emit(as_json, report)


@app.command("demo")
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", help="Keep the compressed model here (default: a temp dir)."),
    keep_blocks: float = typer.Option(0.5, "--keep-blocks", help="Fraction of the block parameters to keep."),
    heal_steps: int = typer.Option(30, "--heal-steps", help="Distillation steps after folding."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compress the embedded default model (all-MiniLM-L6-v2) with pydoc text and show what it costs and keeps."""
    from ..jobs.demo import run_demo

    with contextlib.redirect_stdout(sys.stderr):
        report = run_demo(out=out, keep_blocks=keep_blocks, heal_steps=heal_steps, overwrite=overwrite)
    _emit(as_json, report)


def _silence_libraries() -> None:
    """Library progress bars and warnings off (those that write to the real stderr, not sys.stderr)."""
    import logging
    import warnings

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if next((a for a in args if not a.startswith("-")), None) == "fold":
            _load_method_flags()
        command_at = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
        quiet = any(a in ("--quiet", "-q") for a in args[:command_at])
        with contextlib.redirect_stderr(_QuietStderr()) if quiet else contextlib.nullcontext():
            if quiet:
                _silence_libraries()
            result = app(args=argv, prog_name="layerfold", standalone_mode=False)
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


if __name__ == "__main__":
    sys.exit(main())
