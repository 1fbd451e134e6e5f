"""prune: structured width pruning — MLP channels and attention heads removed by a registered importance score
(``methods.importance``), the projection reading each pruned width refitted by least squares on calibration
inputs (``operations.pruning``), optionally with whole blocks dropped first (width mixed with depth).

Units are MLP channels and attention heads; with grouped-query attention a head unit is a whole key/value group
(its query heads, key and value), so every layer keeps one repeat count. Each unit costs the parameters it
removes; ``uniform`` removes the same number from every layer (the fold exports as the plain architecture with
a smaller ``intermediate_size`` / fewer heads), otherwise units are ranked across layers by score per
parameter (Torch-Pruning's global ranking), each layer keeping at least ``min_keep`` of its width.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.budget import Budget
from ..engine.calibrate import Calibration
from ..core.errors import LayerfoldError
from ..core.families import family_of, projection_shape
from ..operations import Drop, PruneChannels, PruneHeads
from ..operations.geometry import attention_layout, channel_width, mlp_paths
from ..operations.plan import FoldPlan
from .importance import SCORES, Units
from .registry import Candidate, Method, register_method
from .shortgpt import block_parameters, removal_order

TARGETS = ("mlp", "attention", "both")


@dataclass
class PruneOptions:
    """Options of width pruning.

    importance: how units are ranked, by a registered importance score (methods/importance.py).
    target: what loses width: mlp (channels), attention (heads) or both.
    uniform: the same width in every layer (exports as the plain architecture); else ranked across layers.
    compensate: refit the projection reading a pruned width by least squares on calibration inputs.
    min_keep: the least fraction of its channels (and heads) a layer keeps when ranked across layers (halved,
        with a note, when the budget needs more).
    multiple_of: with uniform, the kept MLP width is a multiple of this (dense kernels run faster on such sizes).
    depth: the share of the saving taken by dropping whole blocks first (lowest Block Influence), 0 to 0.9.
    """

    importance: str = field(default="activation", metadata={"choices": SCORES})
    target: str = "both"
    uniform: bool = False
    compensate: bool = True
    min_keep: float = 0.25
    depth: float = 0.0
    multiple_of: int = 32


@dataclass
class _Kind:
    """One kind of unit in one layer: how many there are, what one costs, and its scores."""

    layer: int
    kind: str  # channels | heads
    count: int
    cost: int
    scores: torch.Tensor | None = None
    per_group: int = 1  # query heads per unit (a whole key/value group under grouped-query attention)


def _check(options: PruneOptions) -> None:
    if options.importance not in SCORES:
        raise LayerfoldError(f"--importance must be one of {', '.join(SCORES)}, got {options.importance!r}")
    if options.target not in TARGETS:
        raise LayerfoldError(f"--target must be one of {', '.join(TARGETS)}, got {options.target!r}")
    if not 0 < options.min_keep <= 1:
        raise LayerfoldError(f"--min-keep must be a fraction in (0, 1], got {options.min_keep!r}")
    if isinstance(options.multiple_of, bool) or not isinstance(options.multiple_of, int) or options.multiple_of < 1:
        raise LayerfoldError(f"--multiple-of must be a positive integer, got {options.multiple_of!r}")
    if not 0 <= options.depth <= 0.9:
        raise LayerfoldError(f"--depth must be between 0 and 0.9, got {options.depth!r}")


def _kinds(model: nn.Module, layers: list[int], target: str) -> list[_Kind]:
    """The units each layer offers, with their cost in parameters."""
    family = family_of(model)
    blocks = family.layer_list(model)
    producers, reader = mlp_paths(family)
    found = []
    for i in layers:
        block = blocks[i]
        if target in ("mlp", "both"):
            width = channel_width(block, family)
            cost = projection_shape(block.get_submodule(reader))[0]
            for path in producers:
                module = block.get_submodule(path)
                out_features, in_features = projection_shape(module)
                cost += (out_features // width) * (in_features + (module.bias is not None))
            found.append(_Kind(i, "channels", width, cost))
        if target in ("attention", "both"):
            if family.no_head_pruning:
                if target == "attention":
                    raise LayerfoldError(f"--target attention: {family.no_head_pruning}; prune --target mlp")
                continue
            layout = attention_layout(family, block, "prune")
            g, d = layout.group_size, layout.head_dim
            hidden = projection_shape(block.get_submodule(layout.q))[1]
            per_head = 2 * d * hidden + (d if block.get_submodule(layout.q).bias is not None else 0)
            kv = 2 * d * hidden + (2 * d if block.get_submodule(layout.k).bias is not None else 0)
            # Without grouping a head is its own key/value group: q, k, v rows and o columns.
            found.append(_Kind(i, "heads", layout.kv_heads, g * per_head + kv, per_group=g))
    return found


def _score(model: nn.Module, calibration: Calibration, kinds: list[_Kind], importance: str) -> None:
    family = family_of(model)
    blocks = family.layer_list(model)
    producers, reader = mlp_paths(family)
    score = SCORES[importance]
    channels = [k for k in kinds if k.kind == "channels"]
    if channels:
        scores = score(model, calibration, Units(tuple(k.layer for k in channels), reader, 1, producers))
        for k in channels:
            k.scores = scores[k.layer]
    heads = [k for k in kinds if k.kind == "heads"]
    if heads:
        layout = attention_layout(family, blocks[heads[0].layer], "prune")
        units = Units(tuple(k.layer for k in heads), layout.o, layout.head_dim * layout.group_size, (layout.q,))
        scores = score(model, calibration, units)
        for k in heads:
            k.scores = scores[k.layer]


def _floor(kind: _Kind, min_keep: float) -> int:
    return max(1, math.ceil(min_keep * kind.count - 1e-9))


def _global(kinds: list[_Kind], reduction: int, min_keep: float) -> dict[tuple[int, str], int]:
    """How many units of each kind go, lowest score per parameter first across layers, until ``reduction``."""
    order = []
    for n, kind in enumerate(kinds):
        ranked = torch.argsort(kind.scores.double() / kind.cost, stable=True)
        removable = kind.count - _floor(kind, min_keep)
        order += [(float(kind.scores[j]) / kind.cost, n, int(j)) for j in ranked[:removable]]
    order.sort()
    removed, taken = 0, {}
    for _, n, j in order:
        if removed >= reduction:
            break
        taken[n] = taken.get(n, 0) + 1
        removed += kinds[n].cost
    if removed < reduction:
        return {}
    return taken


def _uniform(kinds: list[_Kind], reduction: int, multiple_of: int) -> dict[int, int]:
    """The same number of units of each kind removed from every layer: of the settings that meet ``reduction``
    (kept MLP widths multiples of ``multiple_of`` when larger than it), the one that removes least."""
    per_kind: dict[str, list[int]] = {}
    for n, kind in enumerate(kinds):
        per_kind.setdefault(kind.kind, []).append(n)
    options: dict[str, list[int]] = {}  # kind -> the numbers of units each layer may lose
    for name, members in per_kind.items():
        count = min(kinds[n].count for n in members)
        kept = range(count, 0, -1)
        if name == "channels":
            kept = [k for k in kept if k == count or k <= multiple_of or k % multiple_of == 0]
        options[name] = [count - k for k in kept]
    best, best_removed = {}, None
    names = list(options)
    for combination in itertools.product(*(options[name] for name in names)):
        taken = {n: lost for name, lost in zip(names, combination) for n in per_kind[name]}
        removed = sum(taken[n] * kinds[n].cost for n in taken)
        if removed >= reduction and (best_removed is None or removed < best_removed):
            best, best_removed = taken, removed
    return best


def prune_plan(model: nn.Module, budget: Budget, calibration: Calibration, options: PruneOptions) -> FoldPlan:
    _check(options)
    family = family_of(model)
    num_layers = len(family.layer_list(model))
    reduction = budget.reduction(model)
    dropped: list[int] = []
    if options.depth > 0:
        sizes = block_parameters(model)
        statistics = calibration.statistics(grams=False)
        for i in removal_order(statistics.block_influence)[: num_layers - 1]:
            if sum(sizes[j] for j in dropped) + sizes[i] > options.depth * reduction:
                break
            dropped.append(i)
        reduction -= sum(sizes[j] for j in dropped)
    kept = [i for i in range(num_layers) if i not in dropped]
    kinds = _kinds(model, kept, options.target)
    _score(model, calibration, kinds, options.importance)
    if options.uniform:
        taken = _uniform(kinds, reduction, options.multiple_of)
    else:
        # A floor that leaves too little to remove is halved (down to one unit per layer), and the log says so:
        # the budget is what the user asked for, the floor a guard.
        for floor in (options.min_keep, options.min_keep / 2, options.min_keep / 4, 1e-9):
            taken = _global(kinds, reduction, floor)
            if taken or reduction <= 0:
                break
        if taken and floor != options.min_keep:
            tqdm.write(f"layerfold: note: prune: --min-keep {options.min_keep:g} leaves too little to remove for "
                       f"{budget.option} {budget.keep:g}; layers keep at least {floor:.2g} of their width", file=sys.stderr)  # fmt: skip
    if not taken and reduction > 0:
        most = sum((k.count - 1) * k.cost for k in kinds)
        raise budget.unreachable(model, most + sum(block_parameters(model)[j] for j in dropped),
                                 f"pruning {options.target} width")  # fmt: skip
    operations: list = []
    for kind_name, op_class in (("heads", PruneHeads), ("channels", PruneChannels)):
        layers, keep = [], []
        for n, kind in enumerate(kinds):
            if kind.kind != kind_name or not taken.get(n):
                continue
            # The highest-scoring units stay (by score alone: within one kind of one layer the cost is the same).
            stays = sorted(int(j) for j in torch.argsort(kind.scores.double(), descending=True, stable=True)[: kind.count - taken[n]])
            if kind_name == "heads":  # a kept key/value group keeps all its query heads
                stays = [group * kind.per_group + h for group in stays for h in range(kind.per_group)]
            layers.append(kind.layer)
            keep.append(stays)
        if layers:
            operations.append(op_class(layers=layers, keep=keep, compensate=options.compensate))
    if dropped:
        operations.append(Drop(layers=sorted(dropped)))
    statistics = calibration.statistics(grams=False)
    return FoldPlan(
        num_layers=num_layers,
        operations=operations,
        provenance={
            "method": "prune",
            "keep": budget.keep,
            "blocks_only": budget.blocks_only,
            **{k: v for k, v in vars(options).items()},
            "calibration": dict(statistics.settings, tokens=statistics.tokens),
        },
    )


def _variants(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{}]
    return [{}, {"importance": "taylor", "target": "mlp", "min_keep": 0.1}, {"uniform": True}]


def _candidates(analysis) -> list[Candidate]:
    return [
        Candidate("prune: heads and channels by activation", "width", {}, in_blocks=False),
        Candidate("prune: MLP channels by activation", "width", {"target": "mlp", "min_keep": 0.1}, in_blocks=False),
        Candidate("prune: MLP channels by Taylor", "width", {"importance": "taylor", "target": "mlp", "min_keep": 0.1},
                  in_blocks=False),  # fmt: skip
        Candidate("prune: MLP channels by Fisher-weighted activation", "width",
                  {"importance": "fisher", "target": "mlp", "min_keep": 0.1}, in_blocks=False),  # fmt: skip
        Candidate("prune: the same MLP width in every layer", "width", {"target": "mlp", "uniform": True},
                  in_blocks=False),  # fmt: skip
        Candidate("prune: a third of the saving from blocks, the rest heads and channels", "drop+width",
                  {"depth": 0.33}, in_blocks=False),  # fmt: skip
    ]


METHOD = register_method(
    Method(
        "prune",
        "structured width pruning of MLP channels and attention heads, least-squares compensated",
        prune_plan,
        PruneOptions,
        _variants,
        calibrated=True,
        candidates=_candidates,
    )
)
