"""tie-similar: tie the layers into K groups (K from the budget) of the layers that are most alike, by average-
linkage clustering of a similarity from the analysis: their weights, their outputs (linear CKA) or their
gradients (Few-shot NAS with Gradient Matching). The groups need not be contiguous or a fixed pattern; every
tied layer may get an SVD-initialised LoRA relaxation (``--rank``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.measures import check_similarity, cluster
from ..operations.plan import FoldPlan
from .registry import Candidate, Method, num_layers, register_method, unique_blocks_for
from .tying import TieOptions, tie_variants


@dataclass
class TieSimilarOptions(TieOptions):
    """Options of tie-similar.

    (and the tie options: rank, init, share, share_bias)
    similarity: what makes layers alike: weights (1 − their relative distance), outputs (linear CKA of their
        output hidden states) or gradients (cosine of their loss gradients).
    """

    similarity: str = "weights"

    def __post_init__(self) -> None:
        check_similarity(self.similarity)


def plan(model, budget, calibration, options: TieSimilarOptions, analysis) -> FoldPlan:
    layers = num_layers(model)
    groups = cluster(analysis.similarity(options.similarity), range(layers), unique_blocks_for(model, budget))
    return FoldPlan.from_groups(groups, num_layers=layers, **options.tie_options(calibration))


def candidates(analysis) -> list[Candidate]:
    measured = analysis.measured_similarities()
    relaxed = "gradients" if "gradients" in measured else "weights"
    return [Candidate(f"tie: similar {s}", "tie", {"similarity": s}) for s in measured] + [
        Candidate(f"tie + LoRA: similar {relaxed}", "lora", {"similarity": relaxed})
    ]


def _variants(quick: bool) -> list[dict]:
    if quick:
        return [{"similarity": "weights"}]
    return [{"similarity": s, **v} for s in ("weights", "outputs", "gradients") for v in tie_variants(False)[:2]]


METHOD = register_method(
    Method(
        "tie-similar",
        "tie the layers into K groups of the most alike (weights, outputs or gradients; average linkage); "
        "per-layer SVD-initialised LoRA of the given rank",
        plan,
        TieSimilarOptions,
        _variants,
        calibrated=True,
        analysed=True,
        candidates=candidates,
    )
)
