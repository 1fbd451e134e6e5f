"""tie-cycle and tie-sequence: Relaxed Recursive Transformers' tying at a budget. K unique blocks (from the
budget) are shared by the layers in a fixed pattern; every tied layer gets a LoRA relaxation initialised from
the truncated SVD of (original − shared). One file for the two patterns: they are one method with two
layouts, registered under the names the sweep and the CLI have always used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..plan import FoldPlan
from .registry import Method, num_layers, register, unique_blocks_for

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


def _variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"init": "average", "rank": 0}, {"init": "average", "rank": 8}]
    return [{"init": init, "rank": rank} for init in ("average", "stepwise", "lower") for rank in _RANKS]


def _planner(layout: str):
    def plan(model, budget, calibration, options: TieOptions) -> FoldPlan:
        return getattr(FoldPlan, layout)(
            num_layers(model),
            unique_blocks_for(model, budget),
            rank=options.rank,
            init=options.init,
            share=options.share,
            share_bias=options.share_bias,
        )

    return plan


for _layout, _text in (("cycle", "layer i uses block i mod K"), ("sequence", "consecutive layers share a block")):
    register(
        Method(
            f"tie-{_layout}",
            f"Relaxed Recursive Transformers tying: {_text}; per-layer SVD-initialised LoRA of the given rank",
            _planner(_layout),
            TieOptions,
            _variants,
            streams=True,
        )
    )
