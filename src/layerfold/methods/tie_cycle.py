"""tie-cycle: Relaxed Recursive Transformers' tying at a budget. K unique blocks (from the budget) are looped:
layer i uses block i mod K; every tied layer may get an SVD-initialised LoRA relaxation (``--rank``)."""

from __future__ import annotations

from ..operations.plan import FoldPlan
from .registry import Candidate, Method, num_layers, register_method, unique_blocks_for
from .tying import TieOptions, tie_variants


def plan(model, budget, calibration, options: TieOptions) -> FoldPlan:
    return FoldPlan.cycle(num_layers(model), unique_blocks_for(model, budget), **options.tie_options(calibration))


def candidates(analysis) -> list[Candidate]:
    # The relaxation forms compete at the same budget: the planner fills each one's rank.
    return [Candidate("tie: cycle", "tie"), Candidate("tie + LoRA: cycle", "lora"),
            Candidate("tie + MoS pool: cycle", "lora", {"relax": "mos"}),
            Candidate("tie + VeRA: cycle", "lora", {"relax": "vera"}),
            Candidate("tie + Kronecker: cycle", "lora", {"relax": "kronecker"})]  # fmt: skip


METHOD = register_method(
    Method(
        "tie-cycle",
        "Relaxed Recursive Transformers tying: layer i uses block i mod K; per-layer SVD-initialised LoRA of the "
        "given rank",
        plan,
        TieOptions,
        tie_variants,
        streams=True,
        candidates=candidates,
    )
)
