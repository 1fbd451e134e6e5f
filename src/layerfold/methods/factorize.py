"""Factorisation plans at a budget, for ``basis`` (Basis Sharing, Wang et al., ICLR 2025: the layers of a group
share one low-rank basis per projection) and ``svd`` (a group of one layer).

For a group of n layers and one projection, stack the n weight matrices (n·out × in), whiten them with the
Cholesky factor S of the summed input Gram matrix XᵀX from calibration data (XᵀX = S Sᵀ), and take the SVD
W S = U Σ Vᵀ. Keeping k singular triplets gives a basis B = V_kᵀ S⁻¹ (k × in) shared by the group and
per-layer coefficients C_i = (U_k Σ_k) rows of layer i (out × k): W_i ≈ C_i B. Truncating in the whitened
space minimises the error of the projection's outputs on the calibration data, not of the weights.
A group of one layer is whitened per-layer SVD (SVD-LLM's truncation), the ``svd`` method.

``factor_plan`` turns a parameter budget into ranks: ``uniform`` keeps the same fraction of every factorised
projection (as the paper does); the other allocations spend the budget where the whitened singular values
(optionally weighted by each projection's loss sensitivity) say it buys most — non-uniform across layers and
projections, leaving a projection whole when that is worth more than the parameters a factorisation saves.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from tqdm.auto import tqdm

from ..core.budget import Budget
from ..engine.calibrate import Statistics
from ..core.errors import LayerfoldError
from ..core.families import Family, family_of, linear_weight
from ..operations import Factor
from ..operations.factor.decompose import Decomposition, MatrixGroup, group_decomposition
from .registry import Candidate
from ..operations.plan import FoldPlan

ALLOCATIONS = ("uniform", "spectrum", "energy", "sensitivity")


# ---- turning a budget into a plan ------------------------------------------------------------------------
def default_shared(family: Family) -> tuple[str, ...]:
    """The projections that read the block's (normalised) input — q, k, v and gate, up in Llama terms — share
    a basis; the output projections (o, down) stay per-layer, as in the paper."""
    return family.attention[:-1] + family.mlp[:-1]


def resolve_projections(family: Family, names: Sequence[str] | None, option: str) -> tuple[str, ...]:
    if names is None:
        return default_shared(family)
    resolved = []
    for name in names:
        matches = [p for p in family.projections if p == name or p.rsplit(".", 1)[-1] == name]
        if not matches:
            raise LayerfoldError(
                f"{option}: {name!r} is not a projection of {family.model_type} "
                f"(one of: {', '.join(family.projections)})"
            )
        resolved += matches
    return tuple(dict.fromkeys(resolved))


def factor_groups(
    family: Family, num_layers: int, *, group_size: int, shared: Sequence[str], whole: Sequence[int]
) -> list[tuple[tuple[int, ...], str]]:
    """(layers, projection) pairs to factorise: ``shared`` projections over runs of ``group_size`` adjacent
    layers, the others per layer; layers in ``whole`` are left alone."""
    if group_size < 1:
        raise LayerfoldError(f"--group-size must be at least 1, got {group_size}")
    candidates = [i for i in range(num_layers) if i not in set(whole)]
    if not candidates:
        raise LayerfoldError("every layer is kept whole: nothing left to factorise")
    runs = [tuple(candidates[k : k + group_size]) for k in range(0, len(candidates), group_size)]
    groups = []
    for projection in family.projections:
        if projection in shared and group_size > 1:
            groups += [(run, projection) for run in runs]
        else:
            groups += [((i,), projection) for i in candidates]
    return groups


def _uniform_ranks(decompositions: list[MatrixGroup], reduction: int) -> list[int] | None:
    """The same kept fraction r in every factorised matrix, the largest r that removes enough."""

    def ranks(fraction: float) -> list[int]:
        chosen = []
        for d in decompositions:
            rank = min(d.max_rank, max(1, int(fraction * d.full_params / d.params_per_rank)))
            chosen.append(rank if d.saves_at(rank) else 0)
        return chosen

    def removed(chosen: list[int]) -> int:
        return sum(d.full_params - d.params(k) for d, k in zip(decompositions, chosen))

    if removed(ranks(0.0)) < reduction:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(ranks(middle)) >= reduction else (low, middle)
    return ranks(low)


def triplet_values(decompositions: list[Decomposition], allocation: str, statistics: Statistics | None) -> list:
    """What keeping each singular triplet is worth, per matrix.

    - ``spectrum``: its share of the matrix's whitened energy (the relative output error it saves);
    - ``energy``: σ² itself (the squared output error on the calibration tokens it saves);
    - ``sensitivity``: σ² times the matrix's loss sensitivity E‖∂L/∂y‖²/out (an isotropic Fisher
      approximation of the loss increase it saves).
    """
    values = []
    for d in decompositions:
        energy = d.singular_values.double().square()
        if allocation == "spectrum":
            values.append(energy / energy.sum().clamp(min=1e-300))
        elif allocation == "energy" or statistics is None or not statistics.sensitivity:
            values.append(energy)
        else:
            weight = sum(statistics.sensitivity[i, d.projection] for i in d.layers) / len(d.layers)
            values.append(energy * weight)
    return values


def _greedy_ranks(decompositions: list[Decomposition], reduction: int, values: list) -> list[int] | None:
    """Greedy knapsack over singular triplets: keep the triplets worth most per parameter until the budget is
    spent; a matrix that would keep (almost) all its triplets is kept whole instead."""
    budget = sum(d.full_params for d in decompositions) - reduction
    if sum(d.params(1) for d in decompositions) > budget:
        return None
    ranks = [1] * len(decompositions)
    spent = sum(d.params(1) for d in decompositions)
    items = []
    for g, d in enumerate(decompositions):
        worth = values[g].tolist()
        break_rank = d.full_params // d.params_per_rank
        for j in range(1, min(d.max_rank, break_rank)):
            items.append((worth[j] / d.params_per_rank, g))
    items.sort(key=lambda item: -item[0])
    for _, g in items:
        cost = decompositions[g].params_per_rank
        if spent + cost > budget:
            continue
        ranks[g] += 1
        spent += cost
    # A matrix that kept (almost) all its triplets is cheaper whole, if the budget allows.
    for g, d in enumerate(decompositions):
        if not d.saves_at(ranks[g]) or ranks[g] >= d.full_params // d.params_per_rank:
            extra = d.full_params - d.params(ranks[g])
            if spent + extra <= budget:
                ranks[g], spent = 0, spent + extra
    return [k if (k == 0 or decompositions[g].saves_at(k)) else 0 for g, k in enumerate(ranks)]


def factor_plan(
    model: nn.Module,
    statistics: Statistics | None,
    budget: Budget,
    *,
    group_size: int = 2,
    shared: Sequence[str] | None = None,
    allocation: str = "uniform",
    whole: Sequence[int] = (),
    method: str = "basis",
    whiten: bool | None = None,
    progress: bool = False,
) -> FoldPlan:
    """A plan of low-rank factorisations that meets ``budget``; see the module docstring.

    Uniform ranks depend only on the shapes, so they need no decomposition (nor real weights: a model on the
    meta device plans too); ``whiten`` (default: whether ``statistics`` is given) is then what the fold does."""
    if allocation not in ALLOCATIONS:
        raise LayerfoldError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    family = family_of(model)
    num_layers = len(family.layer_list(model))
    for i in whole:
        if not -num_layers <= i < num_layers:
            raise LayerfoldError(f"--whole: layer {i} is out of range for a {num_layers}-layer model")
    whole = sorted({i % num_layers for i in whole})  # -1 is the last layer
    shared = resolve_projections(family, shared, "--shared") if group_size > 1 else ()
    groups = factor_groups(family, num_layers, group_size=group_size, shared=shared, whole=whole)
    reduction = budget.reduction(model)
    if allocation == "uniform":
        blocks = family.layer_list(model)
        decompositions = []
        for layers, projection in groups:
            out_features, in_features = linear_weight(blocks[layers[0]].get_submodule(projection)).shape
            decompositions.append(MatrixGroup(tuple(layers), projection, out_features, in_features))
    else:
        decompositions = [
            group_decomposition(model, layers, projection, statistics)
            for layers, projection in tqdm(groups, desc="decomposing", unit="matrix", disable=not progress)
        ]
    if allocation == "uniform":
        ranks = _uniform_ranks(decompositions, reduction)
    else:
        ranks = _greedy_ranks(decompositions, reduction, triplet_values(decompositions, allocation, statistics))
    if ranks is None:
        removable = sum(d.full_params - d.params(1) for d in decompositions if d.saves_at(1))
        raise budget.unreachable(model, removable, f"{method} (every factorised matrix at rank 1)")
    whiten = statistics is not None if whiten is None else whiten
    return FoldPlan(
        num_layers=num_layers,
        operations=[
            Factor(layers=list(d.layers), projection=d.projection, rank=int(k), whiten=whiten)
            for d, k in zip(decompositions, ranks)
            if k > 0
        ],
        provenance={
            "method": method,
            "keep": budget.keep,
            "blocks_only": budget.blocks_only,
            "group_size": group_size,
            "shared": list(shared),
            "allocation": allocation,
            "whole": list(whole),
            "calibration": dict(statistics.settings, tokens=statistics.tokens) if statistics is not None else None,
        },
    )


# The sensitivity-ranked option set the sweep and the planner run for basis and svd: the first and last blocks whole.
ENDS_WHOLE = {"allocation": "sensitivity", "whole": [0, -1]}


def factor_candidates(method: str) -> list[Candidate]:
    """What the planner tries of a factorising method: uniform ranks, and sensitivity ranks with the ends whole."""
    return [
        Candidate(f"{method}: uniform ranks", "basis", {"allocation": "uniform"}, in_blocks=False),
        Candidate(f"{method}: sensitivity ranks, ends whole", "basis", dict(ENDS_WHOLE), in_blocks=False),
    ]
