"""The (whitened) SVD of one projection stacked over a group of layers (Basis Sharing; SVD-LLM for one layer).

For a group of n layers and one projection, stack the n weight matrices (n·out × in), whiten them with the
Cholesky factor S of the summed input Gram matrix XᵀX from calibration data (XᵀX = S Sᵀ), and take the SVD
W S = U Σ Vᵀ. Keeping k singular triplets gives a basis B = V_kᵀ S⁻¹ (k × in) shared by the group and
per-layer coefficients C_i = (U_k Σ_k) rows of layer i (out × k): W_i ≈ C_i B. Truncating in the whitened
space minimises the error of the projection's outputs on the calibration data, not of the weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.errors import LayerfoldError
from ...core.families import family_of, linear_weight

if TYPE_CHECKING:  # calibration sits above the operations; only its type is named here
    from ...engine.calibrate import Statistics


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


def cached_decomposition(
    layers: Sequence[int],
    projection: str,
    weights: Callable[[], list[torch.Tensor]],
    gram: Callable[[int, str], torch.Tensor] | None,
    cache: dict | None,
) -> Decomposition:
    """``decompose`` of the stacked (out, in) ``weights()`` of one projection over ``layers``, whitened by the
    summed ``gram(layer, projection)`` when given, kept in ``cache`` (when given) so that the planner's budgets
    and the fold that follows compute one SVD."""
    key = (tuple(layers), projection, gram is not None)
    if cache is not None and key in cache:
        return cache[key]
    summed = summed_gram([gram(i, projection) for i in layers]) if gram is not None else None
    decomposition = decompose(weights(), summed, layers=tuple(layers), projection=projection)
    if cache is not None:
        cache[key] = decomposition
    return decomposition


def group_decomposition(
    model: nn.Module, layers: Sequence[int], projection: str, statistics: Statistics | None
) -> Decomposition:
    """Decompose one projection over a group of the (still unfolded) model's layers, whitened and cached by
    ``statistics`` when given."""
    blocks = family_of(model).layer_list(model)
    return cached_decomposition(
        layers,
        projection,
        lambda: [linear_weight(blocks[i].get_submodule(projection)) for i in layers],
        statistics.gram if statistics is not None else None,
        statistics.cache if statistics is not None else None,
    )
