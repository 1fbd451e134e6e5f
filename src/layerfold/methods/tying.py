"""What the tie methods (tie-cycle, tie-sequence, tie-similar, foldgpt) share: their options and sweep variants.
Every tied layer can get a LoRA relaxation initialised from the truncated SVD of (original − shared) (Relaxed
Recursive Transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

_RANKS = (0, 8, 32)


@dataclass
class TieOptions:
    """Options of a tie method.

    rank: each tied layer's LoRA relaxation: 0 (none), N, full, or attention=N,mlp=M.
    init: how the shared weights start: average of the group, or one layer each (lower, stepwise).
    share: what a tie group shares: all, attention or mlp.
    share_bias: tie the biases too (by default each layer keeps its own).
    """

    rank: Union[int, str, dict] = 0
    init: str = "average"
    share: str = "all"
    share_bias: bool = False

    def tie_options(self) -> dict[str, Any]:
        """The keywords of ``FoldPlan.from_groups`` (and its patterns) these options set."""
        return {"rank": self.rank, "init": self.init, "share": self.share, "share_bias": self.share_bias}


def tie_variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"init": "average", "rank": 0}, {"init": "average", "rank": 8}]
    return [{"init": init, "rank": rank} for init in ("average", "stepwise", "lower") for rank in _RANKS]
