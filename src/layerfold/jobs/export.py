"""The export job: a folded checkpoint written as a plain Hugging Face checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from ..checkpoints.folded import (
    export,
    read_checkpoint_config,
    skeleton_of,
)
from ..operations.plan import FoldPlan
from ..core.report import Report, human_count, parameter_breakdown, weight_bytes


from .fold import dtype_of
from .settings import ExportSettings


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


def run_export(settings: ExportSettings) -> ExportReport:
    """``layerfold export``."""
    return export_model_dir(settings.model, settings.output.out, dtype=settings.dtype,
                            overwrite=settings.output.overwrite)  # fmt: skip
