"""What the tie methods (tie-cycle, tie-sequence, tie-similar, foldgpt) share: their options and sweep variants.
Every tied layer can get a LoRA relaxation initialised from the truncated SVD of (original − shared) (Relaxed
Recursive Transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

_RANKS = (0, 8, 32)


@dataclass
class TieOptions:
    """Options of a tie method.

    rank: each tied layer's LoRA relaxation: 0 (none), N, full, or attention=N,mlp=M.
    fit: how the shared weights are fitted: average of the group, one layer each (lower, stepwise), or least
        squares on the calibration inputs with whitened relaxations (lstsq; the default with calibration data).
    share: what a tie group shares: all, attention or mlp.
    share_bias: tie the biases too (by default each layer keeps its own).
    """

    rank: Union[int, str, dict] = 0
    fit: Optional[str] = None
    share: str = "all"
    share_bias: bool = False

    def tie_options(self, calibration=None) -> dict[str, Any]:
        """The keywords of ``FoldPlan.from_groups`` (and its patterns) these options set; with no ``fit``, a
        least-squares fit when there is calibration data, else the average."""
        fit = self.fit or ("lstsq" if calibration is not None else "average")
        return {"rank": self.rank, "fit": fit, "share": self.share, "share_bias": self.share_bias}


def tie_variants(quick: bool) -> list[dict[str, Any]]:
    if quick:  # the data-aware fit (the default with calibration data); the full sweep has the others beside it
        return [{"fit": "lstsq", "rank": 0}, {"fit": "lstsq", "rank": 8}]
    return [{"fit": fit, "rank": rank} for fit in ("average", "stepwise", "lower", "lstsq") for rank in _RANKS]
