"""The fold job: a model folder folded by a plan, or by a method at a budget, in memory or streamed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..core import texts as datasets
from ..core.budget import Budget, kept_fractions
from ..engine.calibrate import Calibration, calibration_batches
from ..core.tensor_files import DEFAULT_MAX_SHARD_BYTES
from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..folding.in_memory import fold as fold_in_memory
from ..checkpoints.folded import (
    load_source,
    load_tokenizer,
    save,
    skeleton_of,
)
from ..methods import registry
from ..checkpoints.output_guard import check_output
from ..operations.plan import FoldPlan
from ..core.report import ABSENT, Report, Size, merged, parameter_breakdown, size_table, weight_bytes
from ..core.store import fold_state
from ..folding.streamed import stream_fold
from ..core.settings import build_settings
from .settings import CALIB_TOKENS, FoldSettings


def size_report(model, path: str | Path | None = None) -> Size:
    """Unique parameters split by role, and the bytes of the weight files at ``path`` if given."""
    return Size(parameter_breakdown(model), weight_bytes(path) if path else None)


@dataclass(eq=False)
class FoldReport(Report):
    """``layerfold fold``: what was folded into what, by which plan, and the sizes before and after."""

    model: str
    model_type: str
    out: str
    plan: FoldPlan
    plan_summary: str
    before: Size
    after: Size
    seconds: float
    method: str = ABSENT  # a fold by a method at a budget
    budget: Budget = ABSENT
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
                        f"Budget: {self.budget.keep:g} of the "
                        f"{'block' if self.budget.blocks_only else 'unique'} parameters; kept "
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


def _card_figures(before: Size, folded) -> dict:
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
    calib_tokens: int = CALIB_TOKENS,
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
    fold_in_memory(model, plan, calibration=statistics, progress=progress, sequential=sequential)
    if chosen_dtype is not None:
        model.to(chosen_dtype)
    save(model, out, source=model_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
         figures=_card_figures(before, model))  # fmt: skip
    after = size_report(model, out)
    return FoldReport(
        model=str(model_dir),
        model_type=model.config.model_type,
        out=str(out),
        plan=plan,
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
    calib_tokens: int = CALIB_TOKENS,
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
        budget=budget,
        **kept_fractions(before["parameters"], after["parameters"]),
        calibration=calibration.settings if calibration is not None else None,
        plan=plan,
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
    calib_tokens: int = CALIB_TOKENS,
    calib_window: int | None = None,
    options: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> FoldReport:
    """Fold a checkpoint folder without loading it (``layerfold fold --stream``): by a plan (or a function of
    the layer count) or by a method whose plan needs only the shapes; see ``layerfold.folding.streamed``."""

    check_output(out, {"original model": model_dir, "calibration text": calib}, overwrite=overwrite)
    budget = None
    if method is not None:
        budget = Budget.from_options(keep, keep_blocks)
        make_plan = registry.method_plan(method, budget, options)
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
        folded.method, folded.budget = method, budget
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


def fold(model, plan: FoldPlan | None = None, **settings) -> Any:
    """Fold a model. ``fold(model, plan)`` folds a loaded Hugging Face model in place and returns it (keywords:
    ``calibration``, ``progress``, ``sequential``; see ``layerfold.folding.in_memory.fold``). ``fold(folder,
    plan, out=...)`` or ``fold(folder, method="svd", keep=0.8, calib=..., out=...)`` folds a model folder and
    writes the fold, in memory or with ``stream=True`` a few tensors at a time, and returns its ``FoldReport``;
    the keywords are ``FoldSettings``' fields (and its groups': ``keep``, ``calib``, ``calib_tokens``,
    ``overwrite``, the tie options...), the method's own options as ``method_options``."""
    if not isinstance(model, (str, Path)):
        return fold_in_memory(model, plan, **settings)
    return run_fold(fold_settings(model, plan, **settings))


def fold_settings(model: str | Path, plan: FoldPlan | None = None, **given) -> FoldSettings:
    """``FoldSettings`` from keywords, each given by its own name (a group's fields too: ``keep``, ``out``)."""
    renames = {"calib": "data", "max_shard_bytes": "max_shard_size"}
    given = {renames.get(k, k): v for k, v in given.items()}
    given.update(model=Path(model), plan=plan)
    settings = build_settings(FoldSettings, given, "fold")
    if given:
        raise LayerfoldError(f"fold: unknown setting {sorted(given)[0]!r}")
    return settings


def _plan_for(settings: FoldSettings, tie_options: dict) -> Callable[[int], FoldPlan]:
    """The plan of ``--plan`` (with the tie options set) or of ``--strategy``, as a function of the layer count."""
    plan, strategy, unique = settings.plan, settings.strategy, settings.unique
    if plan is not None and strategy is not None:
        raise LayerfoldError("give either --plan or --strategy, not both")
    if plan is not None and unique is not None:
        raise LayerfoldError("--unique goes with --strategy, not with --plan")
    if plan is None and strategy is None:
        raise LayerfoldError("say how to fold: --plan FILE, or --strategy cycle|sequence|middle_cycle --unique K")
    if strategy is not None and unique is None:
        raise LayerfoldError(f"--strategy {strategy} needs --unique K (the number of unique blocks)")

    def plan_for(num_layers: int) -> FoldPlan:
        if strategy is not None:
            return getattr(FoldPlan, strategy)(num_layers, unique, **tie_options)
        chosen = plan if isinstance(plan, FoldPlan) else FoldPlan.load(plan)
        chosen.set_tie_options(**tie_options)
        chosen.check()
        return chosen

    return plan_for


def run_fold(settings: FoldSettings) -> FoldReport:
    """``layerfold fold``: by a plan or a strategy, or by a method at a budget; in memory or streamed."""
    s, out = settings, settings.output
    calib = datasets.single_source(s.calibration.data)
    dtype_of(s.dtype)  # a bad value fails before anything loads
    if s.dtype is not None and s.stream:
        raise LayerfoldError("--dtype does not go with --stream (a streamed fold keeps the checkpoint's dtype)")
    if s.sequential and s.stream:
        raise LayerfoldError("--sequential does not go with --stream (a streamed fold fits to the original's inputs)")
    plan_file = s.plan if not isinstance(s.plan, FoldPlan) else None
    check_output(out.out, {"original model": s.model, "plan": plan_file, "calibration text": calib},
                 overwrite=out.overwrite)  # fmt: skip
    tie_options = s.tie.given()
    if s.strategy is not None and calib is not None and "whiten" not in tie_options:
        from ..methods.tying import whitens_by_default

        tie_options["whiten"] = whitens_by_default(tie_options.get("rank", 0), calibrated=True)
    budget_given = s.method_options or s.budget.keep is not None or s.budget.keep_blocks is not None
    if s.method is not None and (s.plan is not None or s.strategy is not None or s.unique is not None):
        raise LayerfoldError("--method folds at a budget; it does not go with --plan, --strategy or --unique")
    if s.method is None and budget_given:
        raise LayerfoldError("--keep and the method options need --method")
    calibration = dict(calib=calib, calib_tokens=s.calibration.calib_tokens, calib_window=s.calibration.calib_window)
    common = dict(overwrite=out.overwrite, max_shard_bytes=s.max_shard_size)
    budget = dict(method=s.method, keep=s.budget.keep, keep_blocks=s.budget.keep_blocks)
    options = {**s.method_options, **tie_options}
    if s.stream:
        plan_for = None if s.method is not None else _plan_for(s, tie_options)
        return fold_streamed(s.model, out.out, plan_for=plan_for, **budget, **calibration, options=options, **common)
    if s.method is not None:
        return fold_with_method(s.model, out.out, **budget, **calibration, options=options, **common, dtype=s.dtype,
                                sequential=s.sequential)  # fmt: skip
    return fold_model_dir(s.model, out.out, plan_for=_plan_for(s, tie_options), **calibration, **common,
                          dtype=s.dtype, sequential=s.sequential)  # fmt: skip
