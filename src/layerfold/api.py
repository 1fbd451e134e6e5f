"""Whole jobs behind the CLI commands, callable from Python too."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import data as datasets
from . import eval_tasks
from . import evaluate as ev
from .budget import Budget, kept_fractions
from .calibrate import Calibration, calibration_batches
from .checkpoint import DEFAULT_MAX_SHARD_BYTES
from .errors import LayerfoldError
from .families import family_of
from .folding import fold
from .io import (
    export,
    is_folded_checkpoint,
    load,
    load_any,
    load_source,
    load_tokenizer,
    model_class_of,
    read_checkpoint_config,
    save,
    skeleton_of,
    source_config,
)
from .methods import registry
from .modelcard import EXPORT_TAG, card_tags
from .outputs import check_output
from .plan import FoldPlan
from .report import ABSENT, Report, human_count, markdown_table, merged, parameter_breakdown, size_table, weight_bytes
from .store import fold_state
from .stream import method_plan, stream_fold


def size_report(model, path: str | Path | None = None) -> dict:
    """Unique parameters split by role, and the bytes of the weight files at ``path`` if given."""
    return {"parameters": parameter_breakdown(model), "bytes_on_disk": weight_bytes(path) if path else None}


@dataclass(eq=False)
class FoldReport(Report):
    """``layerfold fold``: what was folded into what, by which plan, and the sizes before and after."""

    model: str
    model_type: str
    out: str
    plan: dict
    plan_summary: str
    before: dict
    after: dict
    seconds: float
    method: str = ABSENT  # a fold by a method at a budget
    budget: dict = ABSENT
    keep: float = ABSENT
    keep_blocks: float = ABSENT
    calibration: dict | None = ABSENT
    streaming: dict = merged()  # a streamed fold: dtype, units, shards, source/output bytes, peak memory

    def markdown(self) -> str:
        return "\n".join(
            [
                f"Folded {self.model} ({self.model_type}) -> {self.out}",
                f"Plan: {self.plan_summary}",
                *(
                    [
                        f"Budget: {self.budget['fraction']:g} of the "
                        f"{'block' if self.budget['counts'] == 'blocks' else 'unique'} parameters; kept "
                        f"{self.keep:.1%} of all unique parameters and {self.keep_blocks:.1%} of the block "
                        "parameters."
                    ]
                    if self.budget is not ABSENT
                    else []
                ),
                "",
                size_table(self.before, self.after),
                "",
                *(
                    ["The original is a quantised GGUF file; the folded model is stored in full precision."]
                    if self.model.endswith(".gguf")
                    else []
                ),
                *(
                    [
                        f"Streamed: {self.streaming['units']} units from {self.streaming['source_bytes'] / 1e9:.2f} "
                        f"GB of {self.streaming['dtype']} weights into {self.streaming['shards']} shard(s); peak "
                        f"resident memory {self.streaming['peak_rss_bytes'] / 1e9:.2f} GB."
                    ]
                    if self.streaming.get("streamed")
                    else []
                ),
                f"Done in {self.seconds:.1f} s.",
            ]
        )


def _card_figures(before: dict, folded) -> dict:
    """What a fold's model card states beside its own size: the original's size and the kept fractions."""
    fractions = kept_fractions(before["parameters"], parameter_breakdown(folded))
    return {
        "original unique parameters": before["parameters"]["total"],
        "kept: all unique parameters": f"{fractions['keep']:.1%}",
        "kept: block parameters": f"{fractions['keep_blocks']:.1%}",
    }


def fold_model_dir(
    model_dir: str | Path,
    out: str | Path,
    *,
    plan_for: FoldPlan | Callable[[int], FoldPlan],
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    dtype: str | None = None,
    calib: datasets.DataSource | None = None,
    calib_tokens: int = 65536,
    calib_window: int | None = None,
    sequential: bool = False,
) -> FoldReport:
    """Load an original model, fold it with a plan (or a function of the layer count), save it (in ``dtype``:
    fp32, fp16 or bf16, if given), report sizes. A plan that fits to calibration data (whitened
    factorisations, least-squares ties) measures it on ``calib``."""
    start = time.perf_counter()
    chosen_dtype = dtype_of(dtype)
    check_output(out, {"original model": model_dir, "calibration text": calib}, overwrite=overwrite)
    if Path(model_dir).is_dir():  # a plan that does not fit (layers, ranks) fails before the weights load
        skeleton = skeleton_of(Path(model_dir))
        layers = len(family_of(skeleton).layer_list(skeleton))
        planned = plan_for if isinstance(plan_for, FoldPlan) else plan_for(layers)
        planned.validate(skeleton)
        _check_calibration_need(planned, calib)
        del skeleton
    if calib is not None:
        datasets.check_source(calib)  # missing, empty or unreadable: fail before the model loads
    model = load_source(model_dir)
    num_layers = len(family_of(model).layer_list(model))
    plan = plan_for if isinstance(plan_for, FoldPlan) else plan_for(num_layers)
    _check_calibration_need(plan, calib)
    before = size_report(model, model_dir)
    statistics = None
    if calib is not None:
        statistics = _calibration(model, model_dir, calib, calib_tokens, calib_window, progress).statistics()
    fold(model, plan, calibration=statistics, progress=progress, sequential=sequential)
    if chosen_dtype is not None:
        model.to(chosen_dtype)
    save(model, out, source=model_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
         figures=_card_figures(before, model))  # fmt: skip
    after = size_report(model, out)
    return FoldReport(
        model=str(model_dir),
        model_type=model.config.model_type,
        out=str(out),
        plan=plan.to_dict(),
        plan_summary=plan.describe(),
        before=before,
        after=after,
        seconds=round(time.perf_counter() - start, 2),
    )


def _check_calibration_need(plan: FoldPlan, calib) -> None:
    if plan.whitens() and calib is None:
        raise LayerfoldError(f"the plan's {plan.calibrated_steps()} need calibration text (--calib PATH)")
    if not plan.whitens() and calib is not None:
        raise LayerfoldError(
            "the plan fits nothing to calibration data: leave out --calib, or give --fit lstsq (ties) or a plan "
            "with whitened factorisations"
        )


def _calibration(model, model_dir, calib, tokens: int, window: int | None, progress: bool) -> Calibration:
    """The calibration batches of ``calib`` for ``model`` (tokenised with the original's tokenizer)."""
    tokenizer = load_tokenizer(model_dir)
    batches = calibration_batches(model, tokenizer, calib, tokens=tokens, window=window)
    settings = {"data": datasets.describe_source(calib)}
    return Calibration(model, batches, settings, mask_token_id=tokenizer.mask_token_id, progress=progress)


def fold_with_method(
    model_dir: str | Path,
    out: str | Path,
    *,
    method: str,
    keep: float | None = None,
    keep_blocks: float | None = None,
    calib: datasets.DataSource | None = None,
    calib_tokens: int = 65536,
    calib_window: int | None = None,
    options: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    dtype: str | None = None,
    sequential: bool = False,
) -> FoldReport:
    """Fold an original model with a registered method at a parameter budget, save it (in ``dtype`` if given),
    report both fractions. ``sequential``: see ``layerfold.fold``."""

    start = time.perf_counter()
    chosen_dtype = dtype_of(dtype)
    chosen = registry.get(method)
    chosen.make_options(dict(options or {}))  # unknown or bad options fail before the model loads
    budget = Budget.from_options(keep, keep_blocks)
    if chosen.calibrated and calib is None:
        raise LayerfoldError(f"method {method} needs calibration text: --calib PATH")
    check_output(out, {"original model": model_dir, "calibration text": calib}, overwrite=overwrite)
    if calib is not None:
        datasets.check_source(calib)  # missing, empty or unreadable: fail before the model loads
    model = load_source(model_dir)
    family_of(model)  # an unsupported architecture fails here, before calibration
    before = size_report(model, model_dir)
    calibration = None
    if calib is not None:
        calibration = _calibration(model, model_dir, calib, calib_tokens, calib_window, progress)
    folded = registry.build(chosen, model, budget, calibration, sequential=sequential, **(options or {}))
    state = fold_state(folded)
    if state is None:
        raise LayerfoldError(f"method {method} leaves the model as it is; nothing to save")
    if chosen_dtype is not None:
        folded.to(chosen_dtype)
    save(folded, out, source=model_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
         figures={"method": f"{method}, {budget.option} {budget.keep:g}", **_card_figures(before, folded)})
    after = size_report(folded, out)
    plan = state.plan
    return FoldReport(
        model=str(model_dir),
        model_type=model.config.model_type,
        out=str(out),
        method=method,
        budget=budget.to_dict(),
        **kept_fractions(before["parameters"], after["parameters"]),
        calibration=calibration.settings if calibration is not None else None,
        plan=plan.to_dict(),
        plan_summary=plan.describe(),
        before=before,
        after=after,
        seconds=round(time.perf_counter() - start, 2),
    )


def fold_streamed(
    model_dir: str | Path,
    out: str | Path,
    *,
    plan_for: FoldPlan | Callable[[int], FoldPlan] | None = None,
    method: str | None = None,
    keep: float | None = None,
    keep_blocks: float | None = None,
    calib: datasets.DataSource | None = None,
    calib_tokens: int = 65536,
    calib_window: int | None = None,
    options: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> FoldReport:
    """Fold a checkpoint folder without loading it (``layerfold fold --stream``): by a plan (or a function of
    the layer count) or by a method whose plan needs only the shapes; see ``layerfold.stream``."""

    check_output(out, {"original model": model_dir, "calibration text": calib}, overwrite=overwrite)
    budget = None
    if method is not None:
        budget = Budget.from_options(keep, keep_blocks)
        make_plan = method_plan(method, budget, options)
    elif plan_for is None:
        raise LayerfoldError("--stream needs a plan: --plan, --strategy or --method")
    elif isinstance(plan_for, FoldPlan):
        make_plan = plan_for
    else:

        def make_plan(model):
            return plan_for(len(family_of(model).layer_list(model)))

    calibration = None
    if calib is not None:
        datasets.check_source(calib)  # missing, empty or unreadable: fail before any work
        tokenizer = load_tokenizer(model_dir)

        def calibration(model):
            return calibration_batches(model, tokenizer, calib, tokens=calib_tokens, window=calib_window)

    report = stream_fold(
        model_dir,
        out,
        make_plan,
        calibration=calibration,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        other_inputs={"calibration text": calib},
        progress=progress,
    )
    own = {
        name: report.pop(name)
        for name in ("model", "model_type", "out", "plan", "plan_summary", "before", "after", "seconds")
    }
    folded = FoldReport(**own, streaming=report)
    if budget is not None:
        folded.method, folded.budget = method, budget.to_dict()
        fractions = kept_fractions(folded.before["parameters"], folded.after["parameters"])
        folded.keep, folded.keep_blocks = fractions["keep"], fractions["keep_blocks"]
    return folded


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise LayerfoldError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(eq=False)
class ExportReport(Report):
    """``layerfold export``: the plain checkpoint written, and whether it is the base architecture as it was
    (a plan of drops and merges only) or has tied and factorised layers merged back into full weights."""

    folded: str
    out: str
    architecture: str
    model_type: str
    layers: int
    original_layers: int
    plan_summary: str
    same_architecture: bool
    parameters: dict
    dtype: str
    bytes_on_disk: int

    def markdown(self) -> str:
        what = (
            f"the plan only removes or merges blocks, so this is {self.architecture} as the original was, with "
            f"{self.layers} of its {self.original_layers} layers: it loads with transformers alone, and a tool "
            f"that reads {self.model_type} checkpoints reads it as it reads the original."
            if self.same_architecture
            else "tied and factorised layers are merged back into per-layer weights, so the export stores every "
            f"kept layer in full ({self.layers} blocks); the folded checkpoint is the smaller one, and loads "
            "with layerfold."
        )
        return (
            f"Exported {self.folded} -> {self.out}: a plain {self.architecture} ({self.model_type}), "
            f"{human_count(self.parameters['total'])} parameters in {self.dtype}, {self.bytes_on_disk:,} bytes on "
            f"disk. {what[0].upper()}{what[1:]}"
        )


def export_model_dir(
    folded_dir: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> ExportReport:
    """``layerfold export``: a folded checkpoint as a plain Hugging Face checkpoint (see ``io.export``)."""
    chosen = dtype_of(dtype)
    config = read_checkpoint_config(folded_dir)
    plan = FoldPlan.from_dict(config["fold_plan"])
    export(folded_dir, out, overwrite=overwrite, dtype=chosen)
    plain = json.loads((Path(out) / "config.json").read_text())
    skeleton = skeleton_of(Path(out))  # counted on the meta device: no second load of the weights
    return ExportReport(
        folded=str(folded_dir),
        out=str(out),
        architecture=config["base_architecture"],
        model_type=plain["model_type"],
        layers=len(plan.kept_layers()),
        original_layers=plan.num_layers,
        plan_summary=plan.describe(),
        same_architecture=plan.keeps_base_architecture(),
        parameters=parameter_breakdown(skeleton),
        dtype=str(plain.get("dtype") or plain.get("torch_dtype")),
        bytes_on_disk=weight_bytes(out),
    )


@dataclass(eq=False)
class InfoReport(Report):
    """``layerfold info``: a folded checkpoint's base model, plan, unique parameters and bytes on disk."""

    path: str
    base_architecture: str
    model_type: str
    layerfold_version: str | None
    layers: int
    layers_kept: int
    unique_blocks: int
    plan: dict
    plan_summary: str
    parameters: dict
    bytes_on_disk: int
    needs_layerfold: bool = True
    why: str = ""

    def markdown(self) -> str:
        params = self.parameters
        rows = [
            ["loads with", ("layerfold (`import layerfold`, then the Auto classes or layerfold.load)"
                            if self.needs_layerfold else "transformers alone") + f": {self.why}"],
            ["base model", f"{self.base_architecture} ({self.model_type})"],
            ["layers", f"{self.layers} -> {self.layers_kept} kept, {self.unique_blocks} unique blocks"],
            ["plan", self.plan_summary],
            ["unique parameters", human_count(params["total"])],
            [
                "- embeddings / blocks / other",
                " / ".join(human_count(params[k]) for k in ("embeddings", "blocks", "other")),
            ],
            ["weights on disk", f"{self.bytes_on_disk:,} bytes"],
            ["written by", f"layerfold {self.layerfold_version}"],
        ]
        return markdown_table(["", self.path], rows)


def checkpoint_info(path: str | Path) -> InfoReport:
    """Describe a model folder: a fold (base model, plan, unique parameters, bytes on disk) or a plain checkpoint
    (an export, an original), and whether it needs layerfold to load, and why."""
    if not is_folded_checkpoint(path):
        return _plain_info(Path(path))
    config = read_checkpoint_config(path)
    plan = FoldPlan.from_dict(config["fold_plan"])
    model = load(path)
    kinds = sorted({op.kind for op in plan.operations})
    return InfoReport(
        needs_layerfold=True,
        why=(
            f"its model type is layerfold ({', '.join(kinds) or 'no'} operations over {config['base_architecture']}"
            + ("" if plan.keeps_base_architecture() else "; tied or factorised projections are layerfold modules")
            + "); `layerfold export` writes a plain checkpoint"
            + (" of the base architecture with fewer layers or smaller widths" if plan.keeps_base_architecture() else "")
        ),
        path=str(path),
        base_architecture=config["base_architecture"],
        model_type=config["base_config"]["model_type"],
        layerfold_version=config.get("layerfold_version"),
        layers=plan.num_layers,
        layers_kept=len(plan.kept_layers()),
        unique_blocks=plan.unique_blocks(),
        plan=plan.to_dict(),
        plan_summary=plan.describe(),
        parameters=parameter_breakdown(model),
        bytes_on_disk=weight_bytes(path),
    )


def _plain_info(path: Path) -> InfoReport:
    if not path.is_dir():
        raise LayerfoldError(f"not a model folder: {path}")
    config, _ = source_config(path)  # one line for a missing or unsupported config
    skeleton = skeleton_of(path)  # counted on the meta device
    layers = len(family_of(skeleton).layer_list(skeleton))
    exported = EXPORT_TAG in card_tags(path)
    return InfoReport(
        path=str(path),
        base_architecture=(config.architectures or [type(skeleton).__name__])[0],
        model_type=config.model_type,
        layerfold_version=None,
        layers=layers,
        layers_kept=layers,
        unique_blocks=layers,
        plan={},
        plan_summary="none (every layer has its own weights)",
        parameters=parameter_breakdown(skeleton),
        bytes_on_disk=weight_bytes(path),
        needs_layerfold=False,
        why=f"a plain {config.model_type} checkpoint" + (" exported by layerfold (see its README.md)" if exported else ""),
    )


@dataclass(eq=False)
class EvalReport(Report):
    """``layerfold eval``: one measurement (``result``: task, metric, value, settings and the task's own keys)."""

    model: str
    data: str | None
    result: dict = merged()

    def markdown(self) -> str:
        result = self.to_dict()
        settings = ", ".join(f"{k}={v}" for k, v in result.get("settings", {}).items())
        value = result["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else f"{value:,}"
        rows = [["model", result["model"]], ["task", result["task"]], [result["metric"], shown]]
        for name, accuracy in result.get("accuracies", {}).items():
            rows.append([f"{name} accuracy", f"{accuracy:.4f} ({result['examples'][name]} examples)"])
        for key in ("top1_agreement", "min", "bytes_on_disk", "peak_rss_bytes"):
            if key in result:
                rows.append([key, f"{result[key]:.4g}" if isinstance(result[key], float) else f"{result[key]:,}"])
        if result.get("data"):
            rows.append(["data", result["data"]])
        rows.append(["settings", settings])
        return markdown_table(["", "value"], rows)


def evaluate_path(
    model_path: str | Path,
    task: str,
    *,
    data: str | Path | None = None,
    reference: str | Path | None = None,
    max_tokens: int | None = None,
    limit: int | None = None,
    max_length: int = 1024,
    stride: int = 512,
    progress: bool = True,
    tasks: str | None = None,
) -> EvalReport:
    """One measurement of a model (original or folded) by a registered task (``eval_tasks.TASKS``); see
    ``layerfold eval --help``. Every input is checked before the model loads."""
    import transformers

    measure = eval_tasks.get(task)
    if tasks is not None and not measure.takes_tasks:
        takers = ", ".join(t.name for t in eval_tasks.TASKS.values() if t.takes_tasks)
        raise LayerfoldError(f"--tasks goes with --task {takers}")
    if measure.needs_data and data is None:
        raise LayerfoldError(f"task {task} needs --data PATH")
    if measure.needs_reference and reference is None:
        raise LayerfoldError(f"task {task} needs --reference MODEL_DIR")
    if max_tokens is not None and max_tokens < 2:
        raise LayerfoldError(f"--max-tokens must be at least 2, got {max_tokens}")
    settings = eval_tasks.Measurement(
        Path(model_path), Path(data) if data is not None else None, Path(reference) if reference is not None else None,
        tasks, max_tokens, limit, max_length, stride, progress,
    )  # fmt: skip
    model_class = model_class_of(model_path)  # a wrong kind of model fails before it loads
    if measure.causal is not None and model_class not in (None, transformers.AutoModelForCausalLM):
        ev.require_kind(model_class, task, causal=measure.causal)
    if measure.check is not None:
        measure.check(settings)
    model = load_any(model_path)
    if measure.causal is not None:
        ev.require_kind(model, task, causal=measure.causal)
    result = measure.run(model, settings)
    return EvalReport(model=str(model_path), data=str(data) if data is not None else None, result=result)
