"""basis: Basis Sharing (Wang et al., ICLR 2025) at a budget — the projections that read the block's input
share one whitened SVD basis across groups of adjacent layers; the others get per-layer whitened SVD
(``methods.factorize``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .factorize import ENDS_WHOLE, factor_candidates, factor_plan
from .registry import Method, register_method


@dataclass
class BasisOptions:
    """Options of Basis Sharing.

    group_size: adjacent layers per shared basis.
    shared: projections that share a basis, e.g. q_proj,k_proj,v_proj,gate_proj,up_proj [default: those that
        read the block's input].
    allocation: how ranks are chosen: uniform (the paper's), spectrum, energy or sensitivity.
    whole: layers left whole, e.g. 0,-1 (the first and the last).
    """

    group_size: int = 2
    shared: Optional[list[str]] = None
    allocation: str = "uniform"
    whole: list[int] = ()


def uniform_only(options) -> str | None:
    """A streamed fold plans from the shapes alone: uniform ranks only."""
    if options.allocation != "uniform":
        return (
            f"--allocation {options.allocation} ranks every matrix's spectrum first; with --stream use "
            "--allocation uniform"
        )
    return None


def plan(model, budget, calibration, options: BasisOptions):
    return factor_plan(model, calibration.statistics(), budget, method="basis", **vars(options))


def stream_plan(model, budget, options: BasisOptions):
    return factor_plan(model, None, budget, method="basis", whiten=True, **vars(options))


def _variants(quick: bool) -> list[dict[str, Any]]:
    return [{"allocation": "uniform"}] if quick else [{"allocation": "uniform"}, dict(ENDS_WHOLE)]


METHOD = register_method(
    Method(
        "basis",
        "Basis Sharing: whitened SVD basis shared by groups of adjacent layers (q, k, v, gate, up), per-layer "
        "whitened SVD for the output projections",
        plan,
        BasisOptions,
        _variants,
        calibrated=True,
        streams=uniform_only,
        stream_planner=stream_plan,
        candidates=lambda analysis: factor_candidates("basis"),
    )
)
