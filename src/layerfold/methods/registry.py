"""One registry of folding methods, so that the CLI, benchmarks and tools use every method without knowing it.

A method turns an original model, a parameter budget and (if it needs one) a calibration set into a
FoldPlan; ``build`` folds a model with it. ``variants`` lists the option sets a benchmark sweeps (a short
list when ``quick``). New methods register here and appear in the sweep and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import nn

from ..budget import Budget
from ..calibrate import Calibration
from ..errors import LayerfoldError
from ..families import family_of
from ..folding import fold
from ..plan import FoldPlan
from ..report import parameter_breakdown
from .basis import factor_plan
from .laco import laco_plan
from .shortgpt import shortgpt_plan


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    plan: Callable[..., FoldPlan | None]  # (model, budget, calibration, **options) -> plan (None: unchanged)
    variants: Callable[[bool], list[dict[str, Any]]] = field(default=lambda quick: [{}])
    calibrated: bool = False  # needs calibration data
    options: tuple[str, ...] = ()  # the keyword options ``plan`` accepts


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise LayerfoldError(f"unknown method '{name}' (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


def build(
    method: Method, model: nn.Module, budget: Budget, calibration: Calibration | None = None, **options: Any
) -> nn.Module:
    """Plan with ``method`` and fold ``model`` (in place) with the plan."""
    if method.calibrated and calibration is None:
        raise LayerfoldError(f"method {method.name} needs calibration data (--calib PATH)")
    check_options(method, options)
    plan = method.plan(model, budget, calibration, **options)
    if plan is None:
        return model
    statistics = calibration.statistics() if plan.whitens() else None
    return fold(model, plan, calibration=statistics, progress=False)


def check_options(method: Method, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        accepted = ", ".join("--" + o.replace("_", "-") for o in method.options) or "no options"
        raise LayerfoldError(
            f"method {method.name} does not take --{unknown[0].replace('_', '-')} (it takes: {accepted})"
        )


def num_layers(model: nn.Module) -> int:
    return len(family_of(model).layer_list(model))


def unique_blocks_for(model: nn.Module, budget: Budget) -> int:
    """The number of whole blocks that spends the budget (rounded), for methods that count in blocks."""
    blocks = parameter_breakdown(model)["blocks"]
    fraction = budget.keep if budget.blocks_only else 1 - budget.reduction(model) / blocks
    if fraction <= 0:
        raise budget.unreachable(model, blocks, "whole-block methods")
    return min(num_layers(model), max(1, round(fraction * num_layers(model))))


def evenly_spaced(num: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``num`` layers, first and last included."""
    return sorted({int(i) for i in np.linspace(0, num - 1, keep).round()}) if keep > 1 else [0]


def _drop_plan(model: nn.Module, kept: list[int]) -> FoldPlan:
    layers = num_layers(model)
    return FoldPlan.from_groups([], drop=sorted(set(range(layers)) - set(kept)), num_layers=layers)


def few_shot(calibration: Calibration, samples: int, length: int = 512) -> list[dict]:
    """LaCo compares last hidden states on a few samples: the first calibration batches, cut to ``length``."""
    return [{key: value[:, :length] for key, value in batch.items()} for batch in calibration.batches[:samples]]


register(Method("original", "the model as it is", lambda model, budget, calibration: None))
register(
    Method(
        "drop-first",
        "keep the first K blocks, remove the rest",
        lambda model, budget, calibration: _drop_plan(model, list(range(unique_blocks_for(model, budget)))),
    )
)
register(
    Method(
        "drop-even",
        "keep K evenly spaced blocks (first and last included), remove the rest",
        lambda model, budget, calibration: _drop_plan(
            model, evenly_spaced(num_layers(model), unique_blocks_for(model, budget))
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
            lambda model, budget, calibration, _s=_strategy, **options: getattr(FoldPlan, _s)(
                num_layers(model), unique_blocks_for(model, budget), **options
            ),
            _tie_variants,
            options=("rank", "init", "share", "share_bias"),
        )
    )


_ENDS_WHOLE = {"allocation": "sensitivity", "whole": [0, -1]}


def _basis_variants(quick: bool) -> list[dict[str, Any]]:
    return [{"allocation": "uniform"}] if quick else [{"allocation": "uniform"}, _ENDS_WHOLE]


def _svd_variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [_ENDS_WHOLE]
    return [{"allocation": "uniform"}, {"allocation": "sensitivity"}, _ENDS_WHOLE]


register(
    Method(
        "basis",
        "Basis Sharing: whitened SVD basis shared by groups of adjacent layers (q, k, v, gate, up), per-layer "
        "whitened SVD for the output projections",
        lambda model, budget, calibration, **options: factor_plan(
            model, calibration.statistics(), budget, method="basis", **options
        ),
        _basis_variants,
        calibrated=True,
        options=("group_size", "shared", "allocation", "whole"),
    )
)
register(
    Method(
        "svd",
        "whitened per-layer SVD truncation of every projection (SVD-LLM's truncation; no sharing)",
        lambda model, budget, calibration, **options: factor_plan(
            model, calibration.statistics(), budget, method="svd", **{"group_size": 1, **options}
        ),
        _svd_variants,
        calibrated=True,
        options=("allocation", "whole"),
    )
)
register(
    Method(
        "shortgpt",
        "ShortGPT: remove the blocks with the lowest Block Influence (or angular distance)",
        lambda model, budget, calibration, **options: shortgpt_plan(
            model, calibration.statistics(grams=False), budget, **options
        ),
        lambda quick: [{"score": "influence"}] if quick else [{"score": "influence"}, {"score": "angular"}],
        calibrated=True,
        options=("score",),
    )
)
register(
    Method(
        "laco",
        "LaCo: collapse adjacent blocks into one (θ_l + Σ(θ_k − θ_l)) while the last hidden state stays similar",
        lambda model, budget, calibration, samples=4, **options: laco_plan(
            model, few_shot(calibration, samples), budget, **options
        ),
        # The paper's check (0.65) rejects every 3-layer merge of these small models (SmolLM2: similarities
        # 0.04-0.46), so the sweep also runs the merges unchecked; a user sets --threshold.
        lambda quick: [{"merge": 3, "threshold": 0.0}],
        calibrated=True,
        options=("samples", "merge", "interval", "threshold"),
    )
)
