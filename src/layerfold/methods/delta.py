"""delta: DeltaLLM's cross-layer deltas (Mikaelyan et al., 2025) as one method. Runs of ``group`` adjacent layers
share one weight per projection, fitted by least squares to their outputs on the calibration inputs, and each
layer keeps a low-rank delta, truncated in the space whitened by its own inputs (a ``tie`` with ``fit=lstsq``
and whitened relaxations). The delta rank is the largest that the budget leaves room for, the same for every
projection; the planner tries it as a candidate that shares and relaxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import LayerfoldError
from ..core.families import family_of, projection_shape
from ..operations.plan import FoldPlan
from ..core.report import parameter_breakdown
from .registry import Candidate, Method, num_layers, register_method

# The automatic group size leaves at least this share of the kept projection parameters to the deltas: with
# groups so large that the shared weights take all of it, the deltas get no rank.
DELTA_SHARE = 1 / 3


@dataclass
class DeltaOptions:
    """Options of delta.

    group: adjacent layers per shared weight (2 as in DeltaLLM); 0 picks the smallest that leaves a third of the
        kept projection parameters to the deltas.
    share: what a group shares: all, attention or mlp.
    """

    group: int = 0
    share: str = "all"


def adjacent_groups(layers: int, size: int) -> list[list[int]]:
    """Runs of ``size`` adjacent layers; the last run holds what is left (a single layer stays unique)."""
    return [list(range(start, min(start + size, layers))) for start in range(0, layers, size)]


def _costs(model, share: str) -> tuple[int, int, int]:
    """One layer's shared projection weights (parameters), what one unit of delta rank costs in one layer, and
    the smallest side of those projections (the largest rank a delta can have)."""
    family = family_of(model)
    block = family.layer_list(model)[0]
    shapes = [projection_shape(block.get_submodule(p)) for p in family.shared_projections(share)]
    return sum(o * i for o, i in shapes), sum(o + i for o, i in shapes), min(min(s) for s in shapes)


def delta_rank(model, budget, groups: list[list[int]], share: str) -> int:
    """The largest delta rank (every projection of every tied layer alike) within the budget; tying a group of
    n layers removes n − 1 copies of the shared weights, and the deltas cost rank·(in + out) per projection."""
    weights, per_rank, smallest = _costs(model, share)
    allowed = budget.counted(model) - budget.reduction(model)
    base = budget.counted(model) - sum(len(g) - 1 for g in groups) * weights
    tied = sum(len(g) for g in groups if len(g) > 1)
    if tied == 0:
        return 0
    return min(smallest, max((allowed - base) // (tied * per_rank), -1))


def pick_group(model, budget, share: str) -> int:
    """The smallest group size that leaves ``DELTA_SHARE`` of the kept projection parameters to the deltas."""
    layers = num_layers(model)
    weights, _, _ = _costs(model, share)
    allowed = budget.counted(model) - budget.reduction(model)
    others = parameter_breakdown(model)["blocks"] - layers * weights  # norms, biases, unshared projections
    if not budget.blocks_only:
        others += budget.counted(model) - parameter_breakdown(model)["blocks"]
    kept_weights = allowed - others
    for size in range(2, layers + 1):
        shared = len(adjacent_groups(layers, size)) * weights
        if shared <= (1 - DELTA_SHARE) * kept_weights:
            return size
    return layers


def plan(model, budget, calibration, options: DeltaOptions) -> FoldPlan:
    layers = num_layers(model)
    if isinstance(options.group, bool) or not isinstance(options.group, int) or options.group < 0:
        raise LayerfoldError(f"--group: must be 0 (automatic) or a group size of at least 2, got {options.group!r}")
    if options.group == 1 or options.group > layers:
        raise LayerfoldError(f"--group: must be between 2 and the model's {layers} layers, got {options.group}")
    size = options.group or pick_group(model, budget, options.share)
    groups = adjacent_groups(layers, size)
    rank = delta_rank(model, budget, groups, options.share)
    if rank < 1:
        shared = 1 - sum(len(g) - 1 for g in groups) / layers
        raise LayerfoldError(
            f"{budget.option} {budget.keep:g}: groups of {size} adjacent layers keep about {shared:.0%} of the "
            f"shared weights and leave no room for a delta of rank 1; use a larger --group"
        )
    return FoldPlan.from_groups(
        groups,
        num_layers=layers,
        share=options.share,
        fit="lstsq",
        rank=int(rank),
        whiten=True,
        provenance={"method": "delta", "group": size, "delta_rank": int(rank)},
    )


def _variants(quick: bool) -> list[dict[str, Any]]:
    return [{}] if quick else [{}, {"group": 2}, {"group": 3}]


METHOD = register_method(
    Method(
        "delta",
        "DeltaLLM: adjacent layers share one least-squares weight, each keeps a whitened low-rank delta that "
        "fills the budget",
        plan,
        DeltaOptions,
        _variants,
        calibrated=True,
        streams=True,  # planned from the shapes; the fit reads the streamed Gram matrices
        candidates=lambda analysis: [Candidate("tie + delta: adjacent runs", "lora", in_blocks=False)],
    )
)
