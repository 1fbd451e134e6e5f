"""svd: whitened per-layer SVD truncation of every projection (SVD-LLM's truncation; no sharing), at a
budget (``methods.factorize``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .basis import uniform_only
from .factorize import ENDS_WHOLE, factor_candidates, factor_plan
from .registry import Method, register_method


@dataclass
class SvdOptions:
    """Options of the per-layer SVD.

    allocation: how ranks are chosen: uniform, spectrum, energy or sensitivity.
    whole: layers left whole, e.g. 0,-1 (the first and the last).
    """

    allocation: str = "uniform"
    whole: list[int] = ()


def plan(model, budget, calibration, options: SvdOptions):
    return factor_plan(model, calibration.statistics(), budget, method="svd", group_size=1, **vars(options))


def stream_plan(model, budget, options: SvdOptions):
    return factor_plan(model, None, budget, method="svd", group_size=1, whiten=True, **vars(options))


def _variants(quick: bool) -> list[dict[str, Any]]:
    return [dict(ENDS_WHOLE)] if quick else [{"allocation": "uniform"}, {"allocation": "sensitivity"}, dict(ENDS_WHOLE)]


METHOD = register_method(
    Method(
        "svd",
        "whitened per-layer SVD truncation of every projection (SVD-LLM's truncation; no sharing)",
        plan,
        SvdOptions,
        _variants,
        calibrated=True,
        streams=uniform_only,
        stream_planner=stream_plan,
        candidates=lambda analysis: factor_candidates("svd"),
    )
)
