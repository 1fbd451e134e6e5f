"""foldgpt: FoldGPT's two steps (Liu et al., 2024) at a budget of K unique blocks: remove the blocks with the
smallest learned gates for half of the saving, then tie the remaining layers into K groups of the most alike
(average-linkage clustering of their gradient cosine, or of their weights when gradients were not measured).
Every tied layer may get an SVD-initialised LoRA relaxation (``--rank``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..analysis.measures import check_similarity, cluster
from ..operations.plan import FoldPlan
from .registry import Candidate, Method, lowest, num_layers, register_method, unique_blocks_for
from .tying import TieOptions


@dataclass
class FoldGPTOptions(TieOptions):
    """Options of foldgpt.

    (and the tie options: rank, init, share, share_bias)
    similarity: what makes the kept layers alike: weights, outputs or gradients [default: gradients when
        measured, else weights].
    """

    similarity: Optional[str] = None

    def __post_init__(self) -> None:
        if self.similarity is not None:
            check_similarity(self.similarity)


def plan(model, budget, calibration, options: FoldGPTOptions, analysis) -> FoldPlan:
    layers, unique = num_layers(model), unique_blocks_for(model, budget)
    measured = analysis.measured_similarities()
    similarity = options.similarity or ("gradients" if "gradients" in measured else "weights")
    # Without trained gates (no gate steps), Block Influence ranks the blocks instead.
    drop = lowest(analysis.gates_or_influence(), (layers - unique + 1) // 2)
    kept = [i for i in range(layers) if i not in drop]
    groups = cluster(analysis.similarity(similarity), kept, unique)
    return FoldPlan.from_groups(groups, drop=drop, num_layers=layers, **options.tie_options(calibration))


METHOD = register_method(
    Method(
        "foldgpt",
        "FoldGPT: remove the blocks with the smallest gates for half the saving, tie the rest into groups of "
        "alike layers",
        plan,
        FoldGPTOptions,
        lambda quick: [{}] if quick else [{}, {"rank": 8}],
        calibrated=True,
        analysed=True,
        candidates=lambda analysis: [Candidate("drop + tie: smallest gates, then similar layers", "drop+tie")],
    )
)
