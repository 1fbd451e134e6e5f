"""tie-sequence: consecutive layers share a block (K contiguous runs as equal as possible, K from the budget);
every tied layer may get an SVD-initialised LoRA relaxation (``--rank``)."""

from __future__ import annotations

from ..operations.plan import FoldPlan
from .registry import Candidate, Method, num_layers, register_method, unique_blocks_for
from .tying import TieOptions, tie_variants


def plan(model, budget, calibration, options: TieOptions) -> FoldPlan:
    return FoldPlan.sequence(num_layers(model), unique_blocks_for(model, budget), **options.tie_options(calibration))


METHOD = register_method(
    Method(
        "tie-sequence",
        "Relaxed Recursive Transformers tying: consecutive layers share a block; per-layer SVD-initialised LoRA "
        "of the given rank",
        plan,
        TieOptions,
        tie_variants,
        streams=True,
        candidates=lambda analysis: [Candidate("tie: sequence", "tie")],
    )
)
