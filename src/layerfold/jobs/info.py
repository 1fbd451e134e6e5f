"""The info job: what a model folder is, whether it needs layerfold to load, its plan and sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..checkpoints.folded import (
    is_folded_checkpoint,
    load,
    read_checkpoint_config,
    skeleton_of,
    source_config,
)
from ..checkpoints.modelcard import EXPORT_TAG, card_tags
from ..operations.plan import FoldPlan
from ..core.report import Report, human_count, markdown_table, parameter_breakdown, weight_bytes
from .settings import InfoSettings




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


def run_info(settings: InfoSettings) -> InfoReport:
    """``layerfold info``."""
    return checkpoint_info(settings.model)
