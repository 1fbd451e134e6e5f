"""drop-lowest: remove the blocks that score lowest in the analysis, in whole blocks (K kept, from the budget):
FoldGPT's smallest gates, ShortGPT's lowest Block Influence, or the lowest angular distance (Gromov et al.).
Unlike ``shortgpt``, which removes blocks until the parameters meet the budget, it keeps round(budget × L)
blocks, as the other whole-block methods do."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import LayerfoldError
from .registry import Candidate, Method, drop_plan, lowest, num_layers, register_method, unique_blocks_for

SCORES = {"gate": "smallest gates", "influence": "lowest Block Influence", "angular": "lowest angular distance"}


@dataclass
class DropLowestOptions:
    """Options of drop-lowest.

    score: which blocks go first: gate (the smallest FoldGPT gates), influence (the lowest Block Influence) or
        angular (the lowest angular distance).
    """

    score: str = "gate"

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise LayerfoldError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")


def scores_of(analysis, score: str) -> list[float]:
    if score == "gate" and not analysis.gates:
        raise LayerfoldError("--score gate: the analysis has no gates (it was run with no gate steps)")
    return {"gate": analysis.gates, "influence": analysis.block_influence, "angular": analysis.angular_distance}[score]


def plan(model, budget, calibration, options: DropLowestOptions, analysis):
    layers, kept = num_layers(model), unique_blocks_for(model, budget)
    removed = lowest(scores_of(analysis, options.score), layers - kept)
    return drop_plan(model, [i for i in range(layers) if i not in removed])


def candidates(analysis) -> list[Candidate]:
    return [
        Candidate(f"drop: {label}", "drop", {"score": score})
        for score, label in SCORES.items()
        if score != "gate" or analysis.gates
    ]


METHOD = register_method(
    Method(
        "drop-lowest",
        "remove the K blocks with the smallest FoldGPT gates (or lowest Block Influence, angular distance)",
        plan,
        DropLowestOptions,
        lambda quick: [{"score": "gate"}] if quick else [{"score": s} for s in SCORES],
        calibrated=True,
        analysed=True,
        candidates=candidates,
    )
)
