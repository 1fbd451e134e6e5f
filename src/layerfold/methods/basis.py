"""Basis Sharing (Wang et al., ICLR 2025): the layers of a group share one low-rank basis per projection.

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

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import Budget
from ..calibrate import Statistics
from ..errors import LayerfoldError
from ..families import Family, family_of, is_transposed, linear_weight
from ..modules import BasisLinear, FoldState, SharedBasis
from ..plan import FoldPlan

ALLOCATIONS = ("uniform", "spectrum", "energy", "sensitivity")


# ---- whitening and decomposition -------------------------------------------------------------------------
def whitening_factor(gram: torch.Tensor, where: str = "") -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = XᵀX. A Gram matrix that is only positive semi-definite (too little
    calibration data, dead inputs) gets a small multiple of the identity added, and the log says so."""
    gram = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    del factor  # n×n: do not hold it while trying the shifted matrices
    scale = float(gram.diagonal().mean().clamp(min=1e-12))
    for exponent in range(-9, 1):
        jitter = scale * 10.0**exponent
        shifted = gram.clone()
        shifted.diagonal().add_(jitter)  # gram + jitter·I without two more n×n matrices
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            tqdm.write(
                f"layerfold: note: {where}: Gram matrix not positive definite; added {jitter:.3g}·I to factorise it",
                file=sys.stderr,
            )
            return factor
    raise LayerfoldError(f"{where}: the calibration Gram matrix cannot be factorised (is the calibration data empty?)")


@dataclass
class MatrixGroup:
    """One projection of a group of layers, stacked (n·out × in): what a rank costs and saves."""

    layers: tuple[int, ...]
    projection: str
    out_features: int
    in_features: int

    @property
    def full_params(self) -> int:
        return len(self.layers) * self.out_features * self.in_features

    @property
    def params_per_rank(self) -> int:
        return self.in_features + len(self.layers) * self.out_features

    @property
    def max_rank(self) -> int:
        return min(len(self.layers) * self.out_features, self.in_features)

    def params(self, rank: int) -> int:
        """Weight parameters after factorising at ``rank`` (0: left whole)."""
        return self.full_params if rank == 0 else rank * self.params_per_rank

    def saves_at(self, rank: int) -> bool:
        return 0 < rank and rank * self.params_per_rank < self.full_params


@dataclass
class Decomposition(MatrixGroup):
    """The (whitened) SVD of one projection stacked over a group of layers, ready to truncate at any rank."""

    coefficients: torch.Tensor  # U Σ: (n·out, r), float64
    basis: torch.Tensor  # Vᵀ S⁻¹: (r, in), float64
    singular_values: torch.Tensor  # (r,)

    def truncate(self, rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Basis (rank, in) and each layer's coefficients (out, rank), float64.

        Each component is rescaled so that its basis row and its coefficient column have the same RMS (the
        product is unchanged). Unbalanced, whitening leaves coefficients of RMS ~10-100 against a basis of
        ~1e-3, and an optimiser whose steps have about the same size for every element (Adam, when healing)
        wrecks the basis in a few steps."""
        basis = self.basis[:rank]
        coefficients = self.coefficients[:, :rank]
        ratio = coefficients.pow(2).mean(0) / basis.pow(2).mean(1).clamp_min(torch.finfo(torch.float64).tiny)
        scale = ratio.clamp_min(torch.finfo(torch.float64).tiny).pow(0.25)  # sqrt(rms(C) / rms(B))
        return basis * scale[:, None], list((coefficients / scale).split(self.out_features, dim=0))

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``truncate`` in the model's dtype: the shared basis and each layer's coefficients, as stored."""
        basis, coefficients = self.truncate(rank)
        return basis.to(dtype).contiguous(), [c.to(dtype).contiguous() for c in coefficients]


def decompose(
    weights: Sequence[torch.Tensor], gram: torch.Tensor | None, *, layers: tuple[int, ...], projection: str
) -> Decomposition:
    """SVD of the stacked (out, in) weights, whitened by ``gram`` (the summed XᵀX of their inputs) if given."""
    stacked = torch.cat([w.detach().double() for w in weights], dim=0)
    if gram is None:
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        basis = vh
    else:
        whitener = whitening_factor(gram, f"layers {list(layers)} {projection}")
        u, s, vh = torch.linalg.svd(stacked @ whitener, full_matrices=False)
        basis = torch.linalg.solve_triangular(whitener, vh, upper=False, left=False)  # Vᵀ S⁻¹
    return Decomposition(
        layers=tuple(layers),
        projection=projection,
        out_features=weights[0].shape[0],
        in_features=weights[0].shape[1],
        coefficients=u * s,
        basis=basis,
        singular_values=s,
    )


def summed_gram(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix of a group's inputs: the sum of its layers' (a single layer's is used as it is, not
    copied: a 5632² float64 matrix is 254 MB)."""
    return grams[0] if len(grams) == 1 else sum(grams)


def group_decomposition(
    model: nn.Module, layers: Sequence[int], projection: str, statistics: Statistics | None
) -> Decomposition:
    """Decompose one projection over a group of the (still unfolded) model's layers, cached on ``statistics``
    so that several budgets reuse one SVD."""
    key = (tuple(layers), projection, statistics is not None)
    cache = statistics.cache if statistics is not None else {}
    if key not in cache:
        blocks = family_of(model).layer_list(model)
        weights = [linear_weight(blocks[i].get_submodule(projection)) for i in layers]
        gram = summed_gram([statistics.gram(i, projection) for i in layers]) if statistics is not None else None
        cache[key] = decompose(weights, gram, layers=tuple(layers), projection=projection)
    return cache[key]


# ---- building the folded modules ------------------------------------------------------------------------
def factorize_layers(
    model: nn.Module,
    family: Family,
    plan: FoldPlan,
    state: FoldState,
    *,
    initialize: bool,
    statistics: Statistics | None = None,
    progress: bool = False,
) -> None:
    """Replace every projection named in ``plan.factors`` by a BasisLinear over a basis held in ``state``."""
    if not plan.factors:
        return
    if initialize and plan.whiten and statistics is None:
        raise LayerfoldError("plan.factors with whiten: true needs calibration data (--calib PATH)")
    layers = family.layer_list(model)
    for entry in tqdm(plan.factors, desc="factorising", unit="matrix", disable=not progress):
        members, projection, rank = sorted(entry["layers"]), entry["projection"], entry["rank"]
        originals = [layers[i].get_submodule(projection) for i in members]
        template = linear_weight(originals[0])
        dtype, device = template.dtype, template.device
        if initialize:
            decomposition = group_decomposition(model, members, projection, statistics if plan.whiten else None)
            basis_weight, coefficients = decomposition.factors(rank, dtype)
            basis = SharedBasis(basis_weight)
        else:
            basis = SharedBasis(torch.empty(rank, template.shape[1], dtype=dtype, device=device))
            coefficients = [torch.empty(template.shape[0], rank, dtype=dtype, device=device) for _ in members]
        state.append(basis)
        for i, original, coefficient in zip(members, originals, coefficients):
            module = BasisLinear(basis, coefficient, original.bias, transposed=is_transposed(original))
            layers[i].set_submodule(projection, module)


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
    factors = [
        {"layers": list(d.layers), "projection": d.projection, "rank": int(k)}
        for d, k in zip(decompositions, ranks)
        if k > 0
    ]
    return FoldPlan(
        num_layers=num_layers,
        factors=factors,
        whiten=statistics is not None if whiten is None else whiten,
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
