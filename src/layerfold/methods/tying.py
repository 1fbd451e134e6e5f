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
        squares on the calibration inputs (lstsq).
    whiten: truncate the relaxations in the space whitened by each layer's calibration inputs (the default
        with calibration data), so that they correct outputs rather than weights.
    share: what a tie group shares: all, attention or mlp.
    share_bias: tie the biases too (by default each layer keeps its own).
    relax: the relaxations' form: lora (private factors), vera (shared frozen random bases, two vectors per
        layer; rank is the bases'), svfit (a fixed SVD whose singular values train), mos (two pools of vectors
        each group shares; each layer reads rank of each by its index maps, through its own rank × rank core,
        plus a private LoRA of rank --private) or kronecker (Compacter: slow matrices each
        group shares, Kronecker-multiplied by each layer's fast factors of rank ``rank``).
    private: mos only: each layer's private LoRA rank beside the pool.
    mos_pool: mos only: the vectors each of a group's two pools holds (at least rank) [default: rank, the whole pool].
    mos_shard: mos only: the vectors in one shard, the unit an index map picks [default: 1].
    kron_factor: kronecker only: the shared slow matrices' size n (n × n; must divide both sides of every
        projection) [default: 4].
    kron_terms: kronecker only: how many slow matrices each group shares (1 to n²) [default: n, Compacter's].
    """

    rank: Union[int, str, dict] = 0
    fit: str = "average"
    share: str = "all"
    share_bias: bool = False
    whiten: Optional[bool] = None
    relax: str = "lora"
    private: int = 0
    mos_pool: int = 0
    mos_shard: int = 0
    kron_factor: int = 0
    kron_terms: int = 0

    def tie_options(self, calibration=None) -> dict[str, Any]:
        """The keywords of ``FoldPlan.from_groups`` (and its patterns) these options set; relaxations are whitened
        unless asked otherwise when there is calibration data."""
        whiten = self.whiten if self.whiten is not None else whitens_by_default(self.rank, calibration is not None)
        return {"rank": self.rank, "fit": self.fit, "share": self.share, "share_bias": self.share_bias,
                "whiten": whiten, "relax": self.relax, "private": self.private,
                "mos_pool": self.mos_pool, "mos_shard": self.mos_shard, "kron_factor": self.kron_factor,
                "kron_terms": self.kron_terms}  # fmt: skip


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
