"""The eval job: one registered measurement (``evaluation.tasks``) of a model folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from ..evaluation import tasks as eval_tasks
from ..evaluation import metrics as ev
from ..core.errors import LayerfoldError
from ..checkpoints.folded import (
    load_any,
    model_class_of,
)
from ..core.report import Report, markdown_table, merged
from .settings import EvalSettings




@dataclass(eq=False)
class Score(Report):
    """What a measurement gives: its task, metric and value, the settings it ran with and the task's own keys
    (``details``: e.g. fidelity's ``min`` and ``reference``, lm-eval's ``accuracies``)."""

    task: str
    metric: str
    value: float
    settings: dict = field(default_factory=dict)
    details: dict = merged()

    @classmethod
    def from_dict(cls, result: dict) -> Score:
        own = {k: result[k] for k in ("task", "metric", "value", "settings") if k in result}
        return cls(**own, details={k: v for k, v in result.items() if k not in own})

    def markdown(self) -> str:
        return f"{self.task}: {self.metric} {self.value}"


@dataclass(eq=False)
class EvalReport(Report):
    """``layerfold eval``: one measurement (``result``: task, metric, value, settings and the task's own keys)."""

    model: str
    data: str | None
    result: Score = merged()

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
    progress: bool = True,
    **given,
) -> EvalReport:
    """One measurement of a model (original or folded) by a registered task (``eval_tasks.TASKS``); the keywords
    are ``EvalSettings``' (``data``, ``reference``, ``max_tokens``, ``limit``, ``max_length``, ``stride``,
    ``tasks``; see ``layerfold eval --help``). Every input is checked before the model loads."""
    return run_evaluate(EvalSettings(model=Path(model_path), task=task, **given), progress=progress)


def run_evaluate(settings: EvalSettings, *, progress: bool = True) -> EvalReport:
    """``layerfold eval``."""
    import transformers

    model_path, task, data, reference = settings.model, settings.task, settings.data, settings.reference
    tasks, max_tokens = settings.tasks, settings.max_tokens

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
        tasks, max_tokens, settings.limit, settings.max_length, settings.stride, progress,
    )  # fmt: skip
    model_class = model_class_of(model_path)  # a wrong kind of model fails before it loads
    if measure.causal is not None and model_class not in (None, transformers.AutoModelForCausalLM):
        ev.require_kind(model_class, task, causal=measure.causal)
    if measure.check is not None:
        measure.check(settings)
    model = load_any(model_path)
    if measure.causal is not None:
        ev.require_kind(model, task, causal=measure.causal)
    result = Score.from_dict(measure.run(model, settings))
    return EvalReport(model=str(model_path), data=str(data) if data is not None else None, result=result)
