"""ShortGPT (Men et al., 2024): remove the blocks that change their input least.

A block's Block Influence is 1 − cos(input, output) of its hidden states, averaged over calibration tokens
(``layerfold.engine.calibrate``); the angular variant uses arccos(cos)/π instead (Gromov et al., 2024). The blocks
with the lowest scores go first, until the budget is met.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.budget import Budget
from ..engine.calibrate import Statistics
from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..operations import Drop
from ..operations.plan import FoldPlan
from .registry import Method, register_method

SCORES = ("influence", "angular")


def block_parameters(model: nn.Module) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in family_of(model).layer_list(model)]


def removal_order(scores: list[float]) -> list[int]:
    """Layer indices, least influential first (ties: the later layer first)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], -i))


def blocks_to_remove(model: nn.Module, order: list[int], budget: Budget, method: str) -> list[int]:
    """The shortest prefix of ``order`` whose removal meets the budget (at least one block stays)."""
    sizes = block_parameters(model)
    reduction = budget.reduction(model)
    removed, chosen = 0, []
    for i in order[: len(sizes) - 1]:
        if removed >= reduction:
            break
        chosen.append(i)
        removed += sizes[i]
    if removed < reduction:
        raise budget.unreachable(model, sum(sorted(sizes)[1:]), f"{method} (removing all blocks but one)")
    return sorted(chosen)


def shortgpt_plan(model: nn.Module, statistics: Statistics, budget: Budget, *, score: str = "influence") -> FoldPlan:
    if score not in SCORES:
        raise LayerfoldError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    scores = statistics.block_influence if score == "influence" else statistics.angular_distance
    num_layers = len(family_of(model).layer_list(model))
    if len(scores) != num_layers:
        raise LayerfoldError(f"calibration has scores for {len(scores)} blocks but the model has {num_layers}")
    drop = blocks_to_remove(model, removal_order(scores), budget, "shortgpt")
    return FoldPlan(
        num_layers=num_layers,
        operations=[Drop(layers=drop)] if drop else [],
        provenance={
            "method": "shortgpt",
            "keep": budget.keep,
            "blocks_only": budget.blocks_only,
            "score": score,
            "scores": [round(float(s), 6) for s in scores],
            "calibration": dict(statistics.settings, tokens=statistics.tokens),
        },
    )


@dataclass
class ShortGPTOptions:
    """Options of ShortGPT.

    score: which blocks go first: influence (1 − cos of a block's input and output) or angular (its arccos/π).
    """

    score: str = "influence"


def _plan(model, budget, calibration, options: ShortGPTOptions) -> FoldPlan:
    return shortgpt_plan(model, calibration.statistics(grams=False), budget, score=options.score)


METHOD = register_method(
    Method(
        "shortgpt",
        "ShortGPT: remove the blocks with the lowest Block Influence (or angular distance)",
        _plan,
        ShortGPTOptions,
        lambda quick: [{"score": "influence"}] if quick else [{"score": "influence"}, {"score": "angular"}],
        calibrated=True,
    )
)
