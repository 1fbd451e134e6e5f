"""The analyse → plan → fold → heal → evaluate jobs behind ``layerfold analyze``, ``plan`` and ``compress``."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..analysis.measures import Analysis, analyze, write_analysis
from .fold import size_report
from ..core.budget import Budget, kept_fractions
from ..engine.calibrate import Calibration, calibration_batches
from ..core.texts import DataSource, check_source, describe_source
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of
from ..checkpoints.folded import load, load_source, load_tokenizer, write_folded
from ..checkpoints.output_guard import REPORT_HEADER, atomic_output_dir, check_output, write_files_atomically
from ..methods.planner import PlanSearch, Proxy, parse_allow, search
from ..core.report import ABSENT, Report, Size, markdown_table, size_table
from ..operations.plan import FoldPlan
from ..core.texts import single_source
from .settings import CALIB_TOKENS, AnalyzeSettings, CompressSettings, PlanSettings

DEFAULT_TOKENS = CALIB_TOKENS  # one default for every command that calibrates
DECODER_WINDOW = 1024
# At most this many calibration batches (and a quarter of them) are held out for the proxy: decoder windows, or
# batches of 16 sentences.
PROXY_BATCHES = {True: 2, False: 8}


@dataclass
class Prepared:
    model: nn.Module
    tokenizer: object
    calibration: Calibration  # the batches the analysis and the methods fit on
    proxy_batches: list[dict]  # held out from them, for the proxy
    data: str

    def all_calibration(self) -> Calibration:
        """Every batch, the proxy's included: what the chosen plan is finally fitted on."""
        return Calibration(
            self.model, self.calibration.batches + self.proxy_batches, {"data": self.data, "proxy_included": True}
        )


def prepare(
    model_dir: str | Path, data: DataSource, *, tokens: int = DEFAULT_TOKENS, window: int | None = None
) -> Prepared:
    """Load the original and cut the data into calibration batches, the last few held out for the proxy."""
    check_source(data)  # missing or empty data fails here, before the model loads
    model = load_source(model_dir, dtype=torch.float32)
    family_of(model)
    tokenizer = load_tokenizer(model_dir)
    causal = is_causal_lm(model)
    batches = calibration_batches(
        model,
        tokenizer,
        data,
        tokens=tokens,
        window=window or (DECODER_WINDOW if causal else None),
        batch_size=16,
    )
    if len(batches) < 2:
        raise LayerfoldError(
            f"{describe_source(data)}: too little text: the proxy needs a held-out batch besides the calibration "
            "batches "
            f"({len(batches)} batch of calibration data; give more text or a larger --calib-tokens)"
        )
    held = min(PROXY_BATCHES[causal], max(1, len(batches) // 4))
    calibration = Calibration(
        model, batches[:-held], {"data": describe_source(data)}, mask_token_id=tokenizer.mask_token_id
    )
    return Prepared(model, tokenizer, calibration, batches[-held:], describe_source(data))


def run_analysis(prepared: Prepared, *, progress: bool = True, **options) -> Analysis:
    return analyze(
        prepared.model,
        prepared.calibration,
        mask_token_id=prepared.tokenizer.mask_token_id,
        progress=progress,
        **options,
    )


def analyze_model_dir(
    model_dir: str | Path,
    data: DataSource,
    out: str | Path,
    *,
    tokens: int = DEFAULT_TOKENS,
    window: int | None = None,
    gate_steps: int = 20,
    overwrite: bool = False,
    progress: bool = True,
) -> AnalyzeReport:
    """``layerfold analyze``: analysis.json, analysis.md and heat-maps in ``out`` (written atomically)."""
    start = time.perf_counter()
    inputs = {"original model": model_dir, "data": data}
    check_output(out, inputs, overwrite=overwrite)
    prepared = prepare(model_dir, data, tokens=tokens, window=window)
    analysis = run_analysis(prepared, gate_steps=gate_steps, progress=progress)
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        markdown = write_analysis(analysis, tmp)
    return AnalyzeReport(
        model=str(model_dir),
        out=str(out),
        analysis=analysis.to_dict(),
        text=markdown,
        seconds=round(time.perf_counter() - start, 1),
    )


def planning_analysis(
    prepared: Prepared, *, allow: Sequence[str] | str | None = None, gate_steps: int = 20, progress: bool = True
) -> Analysis:
    """The analysis the planner reads: the weight energy only between neighbours (all it uses), and the Gram
    matrices in the same pass when a basis may be chosen."""
    allowed = parse_allow(allow)
    return run_analysis(prepared, energy_window=1, gate_steps=gate_steps, grams="basis" in allowed, progress=progress)


def plan_for_budget(
    prepared: Prepared,
    budget: Budget,
    *,
    allow: Sequence[str] | str | None = None,
    gate_steps: int = 20,
    keep_model: bool = True,
    analysis: Analysis | None = None,
    proxy: Proxy | None = None,
    refit: Calibration | None = None,
    progress: bool = True,
) -> tuple[Analysis, PlanSearch]:
    """Analyse (unless given ``analysis``, e.g. one for several budgets) and search. The chosen plan is fitted
    again on ``refit`` (default: every batch, the proxy's included) when it whitens."""
    allowed = parse_allow(allow)
    if analysis is None:
        analysis = planning_analysis(prepared, allow=allowed, gate_steps=gate_steps, progress=progress)
    result = search(
        prepared.model,
        prepared.calibration,
        analysis,
        budget,
        proxy or Proxy(prepared.model, prepared.proxy_batches),
        allow=allowed,
        keep_model=keep_model,
        refit=(refit or prepared.all_calibration()) if keep_model else None,
        progress=progress,
    )
    return analysis, result


def _plan_text(result: PlanSearch, path: Path) -> str:
    plan = result.best.plan
    plan.provenance = {
        **plan.provenance,
        "budget": result.budget.to_dict(),
        "candidates": [{"name": c.name, result.proxy_name: c.proxy} for c in result.candidates[:5]],
    }
    return plan.to_yaml() if path.suffix in (".yaml", ".yml") else plan.to_json()


def plan_model_dir(
    model_dir: str | Path,
    data: DataSource,
    out: str | Path,
    *,
    keep: float | None = None,
    keep_blocks: float | None = None,
    allow: str | Sequence[str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    window: int | None = None,
    gate_steps: int = 20,
    overwrite: bool = False,
    progress: bool = True,
) -> PlanReport:
    """``layerfold plan``: the best plan within the budget, written to ``out`` (YAML or JSON) with the why."""
    start = time.perf_counter()
    budget = Budget.from_options(keep, keep_blocks)
    parse_allow(allow)
    out = Path(out)
    side = out.with_suffix(".md")  # the reasons, beside the plan: guarded like it
    inputs = {"original model": model_dir, "data": data}
    check_output(out, inputs, overwrite=overwrite, kind="file")
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise LayerfoldError(f"--out: the plan file must end in .yaml, .yml or .json, got {out.name}")
    check_output(side, inputs, overwrite=overwrite, kind="file", flag="the plan's reasons file")
    if not out.parent.is_dir():
        raise LayerfoldError(f"--out: folder does not exist: {out.parent}")
    prepared = prepare(model_dir, data, tokens=tokens, window=window)
    analysis, result = plan_for_budget(
        prepared, budget, allow=allow, gate_steps=gate_steps, keep_model=False, progress=progress
    )
    explanation = result.explanation()
    check_output(out, inputs, overwrite=overwrite, kind="file")  # nothing appeared there meanwhile
    check_output(side, inputs, overwrite=overwrite, kind="file", flag="the plan's reasons file")
    write_files_atomically({out: _plan_text(result, out), side: f"{REPORT_HEADER}\n{explanation}\n"})
    return PlanReport(
        model=str(model_dir),
        out=str(out),
        plan=result.best.plan,
        plan_summary=result.best.plan.describe(),
        search=result.to_dict(),
        analysis_seconds=analysis.seconds,
        explanation=explanation,
        seconds=round(time.perf_counter() - start, 1),
    )


def compress_model_dir(
    model_dir: str | Path,
    data: DataSource,
    out: str | Path,
    *,
    keep: float | None = None,
    keep_blocks: float | None = None,
    allow: str | Sequence[str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    window: int | None = None,
    gate_steps: int = 20,
    heal_steps: int = 0,
    heal_config=None,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressReport:
    """``layerfold compress``: analyse, plan, fold, optionally heal (from the original, on the same data) and
    report, into one folded-model folder written atomically (with compress.json/.md, plan.yaml, analysis).

    Over 80 lines: the job's steps in order, each a call into the layers below."""
    from ..heal import HealConfig, heal

    start = time.perf_counter()
    budget = Budget.from_options(keep, keep_blocks)
    parse_allow(allow)
    if heal_steps < 0:
        raise LayerfoldError(f"--heal-steps must be 0 or more, got {heal_steps}")
    inputs = {"original model": model_dir, "data": data}
    check_output(out, inputs, overwrite=overwrite)
    out = Path(out)
    prepared = prepare(model_dir, data, tokens=tokens, window=window)
    before = size_report(prepared.model, model_dir)
    analysis, result = plan_for_budget(prepared, budget, allow=allow, gate_steps=gate_steps, progress=progress)
    folded = result.best_model
    fidelity = {"original": result.original_proxy, "folded": result.best.proxy}
    healed_report = None
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as final:
        if heal_steps:
            # Scratch lives inside the output's temporary folder, so that nothing is left anywhere else.
            scratch = final / ".work"
            unhealed = scratch / "folded"
            unhealed.mkdir(parents=True)
            write_folded(folded, unhealed, source=model_dir)
            config = heal_config or HealConfig(steps=heal_steps)
            config.steps = heal_steps
            healed_report = heal(unhealed, model_dir, data, scratch / "healed", config)
            for item in (scratch / "healed").iterdir():
                item.replace(final / item.name)
            shutil.rmtree(scratch)
            folded = load(final)
        else:
            write_folded(folded, final, source=model_dir)
        after = size_report(folded, final)
        report = CompressReport(
            model=str(model_dir),
            model_type=prepared.model.config.model_type,
            out=str(out),
            data=prepared.data,
            budget=budget,
            **kept_fractions(before["parameters"], after["parameters"]),
            plan=result.best.plan,
            plan_summary=result.best.plan.describe(),
            search=result.to_dict(),
            proxy={"name": result.proxy_name, "tokens": result.proxy_tokens, **fidelity},
            heal=None
            if healed_report is None
            else {
                k: healed_report[k]
                for k in ("steps", "settings", "tokens_this_run", "seconds_this_run", "fidelity_before", "fidelity_after")
            },
            analysis_seconds=analysis.seconds,
            before=before,
            after=after,
            seconds=round(time.perf_counter() - start, 1),
        )
        (final / "plan.yaml").write_text(_plan_text(result, final / "plan.yaml"))
        write_analysis(analysis, final)
        (final / "compress.json").write_text(report.to_json() + "\n")
        report.explanation = result.explanation()
        (final / "compress.md").write_text(report.markdown() + "\n")
    return report


@dataclass(eq=False)
class AnalyzeReport(Report):
    """``layerfold analyze``: the analysis (``analysis.json``) and its Markdown (``analysis.md``)."""

    model: str
    out: str
    analysis: dict
    text: str = field(repr=False, metadata={"hidden": True})  # the Markdown, already written to analysis.md
    seconds: float = 0.0

    def markdown(self) -> str:
        return self.text


@dataclass(eq=False)
class PlanReport(Report):
    """``layerfold plan``: the chosen plan, the search that chose it and why."""

    model: str
    out: str
    plan: FoldPlan
    plan_summary: str
    search: dict
    analysis_seconds: dict
    explanation: str
    seconds: float

    def markdown(self) -> str:
        return f"Plan written to {self.out}: {self.plan_summary}\n\n{self.explanation}"


@dataclass(eq=False)
class CompressReport(Report):
    """``layerfold compress``: the budget, the chosen plan and its search, the proxy fidelity, the healing (if
    any) and the sizes before and after."""

    model: str
    model_type: str
    out: str | None
    data: str
    budget: Budget
    keep: float
    keep_blocks: float
    plan: FoldPlan
    plan_summary: str
    search: dict
    proxy: dict
    heal: dict | None
    analysis_seconds: dict
    before: Size
    after: Size
    seconds: float
    explanation: str = ABSENT  # the search's explanation (in compress.md; not in compress.json)

    def markdown(self) -> str:
        report = self
        proxy = report["proxy"]
        rows = [["original", f"{proxy['original']:.4f}"], ["folded", f"{proxy['folded']:.4f}"]]
        heal = report.get("heal")
        healed = []
        if heal:
            # The heal trains on all of the data, so its fidelity is measured on the heal's own held-out slice.
            metric = "kl" if "after_kl" in heal["fidelity_after"] else "cosine"
            healed = [
                "",
                f"Healed {heal['steps']} steps ({heal['tokens_this_run']:,} tokens, {heal['seconds_this_run']:.0f} s); "
                f"{metric} on the heal's held-out slice: {heal['fidelity_before']['before_' + metric]:.4f} before, "
                f"{heal['fidelity_after']['after_' + metric]:.4f} after.",
            ]
        lines = [
            f"Compressed {report['model']} ({report['model_type']})" + (f" -> {report['out']}" if report["out"] else ""),
            f"Plan: {report['plan_summary']}",
            f"Budget: {report['budget']['fraction']:g} of the "
            f"{'block' if report['budget']['counts'] == 'blocks' else 'unique'} parameters; kept {report['keep']:.1%} "
            f"of all unique parameters and {report['keep_blocks']:.1%} of the block parameters.",
            "",
            size_table(report["before"], report["after"]),
            "",
            f"Fidelity to the original ({proxy['name']} on {proxy['tokens']} held-out calibration tokens"
            + (
                ", measured before the chosen plan was fitted again on all the data):"
                if report["search"].get("refit_tokens")
                else "):"
            ),
            "",
            markdown_table(["model", proxy["name"]], rows),
            *healed,
            "",
            "Why this plan:",
            "",
            report.get("explanation", ""),
            "",
            f"Done in {report['seconds']:.0f} s.",
        ]
        return "\n".join(lines)


def _needs_data(data) -> DataSource:
    source = single_source(data)
    if source is None:
        raise LayerfoldError("give the calibration text: --data PATH")
    return source


def run_analyze(settings: AnalyzeSettings) -> AnalyzeReport:
    """``layerfold analyze``."""
    s = settings
    return analyze_model_dir(s.model, _needs_data(s.calibration.data), s.output.out, tokens=s.calibration.calib_tokens, window=s.calibration.calib_window,
                             gate_steps=s.gate_steps, overwrite=s.output.overwrite)  # fmt: skip


def run_plan(settings: PlanSettings) -> PlanReport:
    """``layerfold plan``."""
    s = settings
    return plan_model_dir(s.model, _needs_data(s.calibration.data), s.output.out, keep=s.budget.keep,
                          keep_blocks=s.budget.keep_blocks, allow=s.search.allow, tokens=s.calibration.calib_tokens, window=s.calibration.calib_window,
                          gate_steps=s.search.gate_steps, overwrite=s.output.overwrite)  # fmt: skip


def run_compress(settings: CompressSettings) -> CompressReport:
    """``layerfold compress``."""
    s = settings
    return compress_model_dir(s.model, _needs_data(s.calibration.data), s.output.out, keep=s.budget.keep,
                              keep_blocks=s.budget.keep_blocks, allow=s.search.allow,
                              tokens=s.calibration.calib_tokens, window=s.calibration.calib_window, gate_steps=s.search.gate_steps,
                              heal_steps=s.heal_steps, overwrite=s.output.overwrite)  # fmt: skip
