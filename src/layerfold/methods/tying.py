"""What the tie methods (tie-cycle, tie-sequence, tie-similar, foldgpt) share: their options and sweep variants.
Every tied layer can get a LoRA relaxation initialised from the truncated SVD of (original − shared) (Relaxed
Recursive Transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ..operations.tie.forms import FORM_OPTION_NAMES, FormOptions

_RANKS = (0, 8, 32)


@dataclass
class TieOptions(FormOptions):
    """Options of a tie method.

    rank: each tied layer's LoRA relaxation: 0 (none), N, full, or attention=N,mlp=M.
    fit: how the shared weights are fitted: average of the group, one layer each (lower, stepwise), or least
        squares on the calibration inputs (lstsq).
    whiten: truncate the relaxations in the space whitened by each layer's calibration inputs (the default
        with calibration data), so that they correct outputs rather than weights.
    share: what a tie group shares: all, attention or mlp.
    share_bias: tie the biases too (by default each layer keeps its own).
    relax: the relaxations' form (``operations.tie.forms``); each form's options are fields too, inherited from
        ``FormOptions`` with their own help.
    """

    rank: Union[int, str, dict] = 0
    fit: str = "average"
    share: str = "all"
    share_bias: bool = False
    whiten: Optional[bool] = None
    relax: str = "lora"

    def tie_options(self, calibration=None) -> dict[str, Any]:
        """The keywords of ``FoldPlan.from_groups`` (and its patterns) these options set; relaxations are whitened
        unless asked otherwise when there is calibration data."""
        whiten = self.whiten if self.whiten is not None else whitens_by_default(self.rank, calibration is not None)
        return {"rank": self.rank, "fit": self.fit, "share": self.share, "share_bias": self.share_bias,
                "whiten": whiten, "relax": self.relax,
                **{name: getattr(self, name) for name in FORM_OPTION_NAMES}}  # fmt: skip


def whitens_by_default(rank, calibrated: bool) -> bool:
    """Tie relaxations are whitened by default when there is calibration data and a ``rank`` gives any
    projection a relaxation (the choice made on development data: see the README's "Fitting to data")."""
    relaxed = any(r != 0 for r in rank.values()) if isinstance(rank, dict) else rank != 0
    return calibrated and relaxed


def tie_variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"fit": "average", "rank": 0}, {"fit": "average", "rank": 8}]
    fits = [{"fit": fit, "rank": rank} for fit in ("average", "stepwise", "lower", "lstsq") for rank in _RANKS]
    # Relaxations as Relaxed Recursive Transformers initialise them (the plain SVD), beside the whitened default.
    return fits + [{"fit": "average", "rank": rank, "whiten": False} for rank in _RANKS if rank]
