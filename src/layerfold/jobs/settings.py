"""What the jobs are set to: each command's settings are a dataclass, and the ``layerfold`` command is generated
from them (``cli.generate``): a field is an option, its metadata (``core.settings.setting``) says its help and how the text on the
command line becomes its value, and its default is stated here once. The option groups several commands share
(where to write, calibration text, the size budget) are declared once, as the dataclasses below.

The CLI imports this module only when a command runs (``layerfold --help`` lists the commands without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.errors import LayerfoldError
from ..core.settings import parse_list, setting  # noqa: F401 (the jobs' settings use them from here too)
from ..core.tensor_files import DEFAULT_MAX_SHARD_BYTES, parse_size
from ..operations.tie.forms import FORM_CHOICES, FormOptions, forms_help

CALIB_TOKENS = 65536
MIX_HELP = " Repeat to mix domains: each file gives an equal share of the tokens."
TEXT_FORMATS = "plain, WikiText, STS-B, .jsonl or a datasets folder"


@dataclass(kw_only=True)
class Output:
    """Where a job writes, and how it reports."""

    out: Path = setting(..., help="Folder to write to.")
    overwrite: bool = setting(False, help="Replace --out if it exists.")
    json: bool = setting(False, help="Print the report as one JSON object.")


@dataclass(kw_only=True)
class Report:
    """How a job that writes nothing reports."""

    json: bool = setting(False, help="Print the report as one JSON object.")


@dataclass(kw_only=True)
class CalibrationText:
    """Calibration text: the fold's fits (whitened factorisations, least-squares ties), the analysis and the
    planner's proxy read it."""

    data: Optional[list[Path]] = setting(help=f"Calibration text: {TEXT_FORMATS}.{MIX_HELP}")
    calib_tokens: int = setting(CALIB_TOKENS, help="Calibration tokens to use.")
    calib_window: Optional[int] = setting(
        help="Tokens per calibration window.",
        default_text="decoders 2048 (1024 where the planner measures: analyze, plan, compress); encoders 128",
    )


@dataclass(kw_only=True)
class SizeBudget:
    """The size to fold to: one of the two fractions."""

    keep: Optional[float] = setting(help="Fraction of all unique parameters to keep.")
    keep_blocks: Optional[float] = setting(
        help="Fraction of the transformer-block parameters to keep (embeddings not counted)."
    )


@dataclass(kw_only=True)
class Search:
    """What the planner may use, and how much it measures first."""

    allow: str = setting("drop,tie,basis,lora,width", help="What the plan may use: drop, tie, basis, lora, width.")
    gate_steps: int = setting(20, help="Steps to train the block gates (0: no gates).")


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


def _share_choices() -> tuple[str, ...]:
    from ..operations.tie.spec import SHARE_CHOICES

    return SHARE_CHOICES


def _fit_choices() -> tuple[str, ...]:
    from ..operations.tie.spec import GROUP_FIT_CHOICES

    return GROUP_FIT_CHOICES


def _methods_help() -> str:
    from ..methods import registry

    return f"Fold at a budget with a method: {', '.join(registry.REGISTRY)}."


ORIGINAL = "Original model: a local Hugging Face folder or a .gguf file."
STRATEGIES = ("cycle", "sequence", "middle_cycle")  # FoldPlan's constructors of the same names
DTYPE_CHOICES = ("fp32", "fp16", "bf16")


@dataclass(kw_only=True)
class TieSettings:
    """How a fold's ties are made (``--strategy``, a ``--plan``'s ties and the tie methods)."""

    rank: Optional[Any] = setting(help="Relaxation rank: N, full, or attention=N,mlp=M.", parse=parse_rank)
    share: Optional[str] = setting(help="What a tie group shares.", choices=_share_choices, default_text="all")
    fit: Optional[str] = setting(
        help="How a tie's shared weights are fitted: the average of its layers, one layer each (lower, stepwise), "
        "or least squares on the calibration inputs (lstsq, needs --calib).",
        choices=_fit_choices, aliases=("--init",), default_text="average",
    )  # fmt: skip
    whiten: Optional[bool] = setting(
        help="Truncate tie relaxations in the space whitened by each layer's calibration inputs.",
        negatable=True, default_text="on with --calib and a rank",
    )  # fmt: skip
    relax: Optional[str] = setting(help=forms_help, choices=lambda: FORM_CHOICES, default_text="lora")
    forms: FormOptions = field(default_factory=FormOptions)  # each form's options (``--mos-pool``, ...)

    def given(self) -> dict[str, Any]:
        """The options the user set (the rest are left to the plan or the method)."""
        own = {name: value for name, value in vars(self).items() if value is not None and name != "forms"}
        return {**own, **{name: value for name, value in vars(self.forms).items() if value}}


@dataclass(kw_only=True)
class FoldSettings:
    """Fold a model and save it: by a plan or tying strategy, or by a method at a parameter budget."""

    model: Path = setting(..., argument=True, help=ORIGINAL)
    plan: Optional[Path] = setting(help="A FoldPlan as YAML or JSON.")
    strategy: Optional[str] = setting(help="Tie layers by a fixed pattern.", choices=STRATEGIES)
    unique: Optional[int] = setting(help="Number of unique blocks for --strategy.")
    tie: TieSettings = field(default_factory=TieSettings)
    method: Optional[str] = setting(help=_methods_help)
    budget: SizeBudget = field(default_factory=SizeBudget)
    calibration: CalibrationText = field(default_factory=CalibrationText)
    stream: bool = setting(False, help="Fold a safetensors checkpoint folder a group of tensors at a time, without "
                           "loading it (for models larger than memory).")  # fmt: skip
    max_shard_size: int = setting(DEFAULT_MAX_SHARD_BYTES, parse=parse_size, default_text="5GB",
                                  help="Largest output weight file; bigger models are written in shards.")  # fmt: skip
    dtype: Optional[str] = setting(help="Save the folded weights in this dtype.", choices=DTYPE_CHOICES,
                                   default_text="as the original loads")  # fmt: skip
    sequential: bool = setting(False, negatable=True, help="Refit what the plan fits to calibration data on the "
                               "inputs the folded layers before it produce (a streamed fold fits to the original's "
                               "inputs).")  # fmt: skip
    output: Output = field(default_factory=Output)
    method_options: dict = field(default_factory=dict)  # the method's own options (``fold``'s generated flags)


@dataclass(kw_only=True)
class InfoSettings:
    """Describe a model folder: whether it needs layerfold to load and why, its plan, unique parameters and size
    on disk."""

    model: Path = setting(..., argument=True, help="A model folder: folded by layerfold, exported, or an original.")
    report: Report = field(default_factory=Report)


@dataclass(kw_only=True)
class ExportSettings:
    """Write a plain Hugging Face checkpoint (relaxations merged) that loads without layerfold."""

    model: Path = setting(..., argument=True, help="A folded model written by layerfold.")
    dtype: Optional[str] = setting(help="Weights in this dtype.", choices=DTYPE_CHOICES, default_text="as stored")
    output: Output = field(default_factory=Output)


def _task_choices() -> tuple[str, ...]:
    from ..evaluation.tasks import TASKS

    return tuple(TASKS)


def _task_help() -> str:
    from ..evaluation.tasks import TASKS

    return "What to measure: " + "; ".join(f"{t.name}, {t.summary}" for t in TASKS.values()) + "."


@dataclass(kw_only=True)
class EvalSettings:
    """Measure a model: perplexity, STS-B Spearman, fidelity to a reference, size, speed, or zero-shot accuracy
    on local lm-evaluation-harness tasks."""

    model: Path = setting(..., argument=True, help="A model folder (original or folded) or a .gguf file.")
    task: str = setting(..., help=_task_help, choices=_task_choices)
    data: Optional[Path] = setting(help="Text, WikiText raw, or STS-B tsv file; for lm-eval a GLUE-layout folder.")
    tasks: Optional[str] = setting(help="lm-eval tasks, comma-separated: glue_sst2_dev, glue_rte_dev.",
                                   default_text="both")  # fmt: skip
    reference: Optional[Path] = setting(help="Reference model for --task fidelity.")
    max_tokens: Optional[int] = setting(help="Cap on tokens read (ppl, fidelity).")
    limit: Optional[int] = setting(help="Cap on pairs/sentences (sts, fidelity, speed) or examples per task (lm-eval).")
    max_length: int = setting(1024, help="Window length for ppl and fidelity.")
    stride: int = setting(512, help="Window stride for ppl.")
    report: Report = field(default_factory=Report)


@dataclass(kw_only=True)
class AnalyzeSettings:
    """Measure where a model is redundant: Block Influence, layer similarity, weight similarity, gradients, gates."""

    model: Path = setting(..., argument=True, help=ORIGINAL)
    calibration: CalibrationText = field(default_factory=CalibrationText)
    gate_steps: int = setting(20, help="Steps to train the block gates (0: no gates).")
    output: Output = field(default_factory=Output)


@dataclass(kw_only=True)
class PlanSettings:
    """Search the fold plans within a budget and write the best one, with the proxy values of the best few."""

    model: Path = setting(..., argument=True, help=ORIGINAL)
    calibration: CalibrationText = field(default_factory=CalibrationText)
    budget: SizeBudget = field(default_factory=SizeBudget)
    search: Search = field(default_factory=Search)
    output: Output = field(default_factory=Output)


@dataclass(kw_only=True)
class CompressSettings(PlanSettings):
    """Analyse, plan, fold, heal (optional) and evaluate in one command."""

    heal_steps: int = setting(0, help="Distillation steps after folding (0: no healing).")


@dataclass(kw_only=True)
class DemoSettings:
    """Compress the embedded default model (all-MiniLM-L6-v2) with pydoc text and show what it costs and keeps."""

    out: Optional[Path] = setting(help="Keep the compressed model here.", default_text="a temporary folder")
    keep_blocks: float = setting(0.5, help="Fraction of the block parameters to keep.")
    heal_steps: int = setting(30, help="Distillation steps after folding.")
    quick: bool = setting(False, help="A faster demo: a quarter of the calibration tokens and of the gates' steps.")
    overwrite: bool = setting(False, help="Replace --out if it exists.")
    json: bool = setting(False, help="Print the report as one JSON object.")
