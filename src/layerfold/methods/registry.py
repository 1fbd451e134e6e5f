"""One registry of folding methods, so that benchmarks and tools sweep every method without knowing them.

A method turns an original model and a number of unique blocks into a folded model; ``variants`` lists the
option sets a benchmark sweeps (a short list when ``quick``). Later methods register here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from ..families import family_of
from ..fold import fold
from ..plan import FoldPlan


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Callable[..., nn.Module]  # (model, unique_blocks, **options) -> folded model
    variants: Callable[[bool], list[dict[str, Any]]] = field(default=lambda quick: [{}])


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def num_layers(model: nn.Module) -> int:
    return len(family_of(model).layer_list(model))


def _fold(model: nn.Module, plan: FoldPlan) -> nn.Module:
    return fold(model, plan, progress=False)


def evenly_spaced(num: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``num`` layers, first and last included."""
    return sorted({int(i) for i in np.linspace(0, num - 1, keep).round()}) if keep > 1 else [0]


register(Method("original", "the model as it is", lambda model, unique_blocks: model))
register(
    Method(
        "drop-first",
        "keep the first K blocks, remove the rest",
        lambda model, unique_blocks: _fold(
            model, FoldPlan.from_groups([], drop=range(unique_blocks, num_layers(model)), num_layers=num_layers(model))
        ),
    )
)
register(
    Method(
        "drop-even",
        "keep K evenly spaced blocks (first and last included), remove the rest",
        lambda model, unique_blocks: _fold(
            model,
            FoldPlan.from_groups(
                [],
                drop=sorted(set(range(num_layers(model))) - set(evenly_spaced(num_layers(model), unique_blocks))),
                num_layers=num_layers(model),
            ),
        ),
    )
)

_TIE_RANKS = (0, 8, 32)


def _tie_variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"init": "average", "rank": 0}, {"init": "average", "rank": 8}]
    return [{"init": init, "rank": rank} for init in ("average", "stepwise", "lower") for rank in _TIE_RANKS]


for _strategy, _text in (("cycle", "layer i uses block i mod K"), ("sequence", "consecutive layers share a block")):
    register(
        Method(
            f"tie-{_strategy}",
            f"Relaxed Recursive Transformers tying: {_text}; per-layer SVD-initialised LoRA of the given rank",
            lambda model, unique_blocks, _s=_strategy, **options: _fold(
                model, getattr(FoldPlan, _s)(num_layers(model), unique_blocks, **options)
            ),
            _tie_variants,
        )
    )
