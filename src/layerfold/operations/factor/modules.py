"""The modules of a factorised projection: the basis, held once in the store, and each layer's BasisLinear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import FoldedProjection


class SharedBasis(nn.Module):
    """A rank-k basis of a projection's input space, ``weight`` (k, in), shared by the layers of a factor
    group (a group of one is a plain truncated SVD)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class BasisLinear(FoldedProjection):
    """A projection factorised as ``y = (x Bᵀ) Cᵀ + b``: B is the group's shared basis, C (out, k) this
    layer's own coefficients and b its own bias. Works in place of nn.Linear and of GPT-2's Conv1D.

    A shared basis may have a rank above the break-even ``in·out / (in + out)`` (it is paid for once per group,
    not per layer); then a call over many tokens costs fewer multiply-adds as ``W = C B`` formed once and
    applied than as two factor products, and ``forward`` takes that path (see ``merges_for``)."""

    def __init__(
        self, basis: SharedBasis, coefficients: torch.Tensor, bias: nn.Parameter | None, *, transposed: bool
    ) -> None:
        super().__init__()
        self._basis = (basis,)  # owned by the FoldState, as in TiedLinear
        self.coefficients = nn.Parameter(coefficients)
        self.bias = bias
        self.transposed = transposed

    @property
    def basis(self) -> SharedBasis:
        return self._basis[0]

    @property
    def weight(self) -> torch.Tensor:
        """For code that reads ``.weight.dtype``/``.device``; the effective weight is ``merged_weight()``."""
        return self.coefficients

    @property
    def rank(self) -> int:
        return self.basis.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.basis.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.coefficients.shape[0]

    def merges_for(self, tokens: int) -> bool:
        """Whether forming the merged weight, then one product, costs fewer multiply-adds for this many tokens
        than the two factor products: ``k·in·out + n·in·out < n·k·(in + out)``."""
        k, n_in, n_out = self.rank, self.in_features, self.out_features
        return k * n_in * n_out + tokens * n_in * n_out < tokens * k * (n_in + n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merges_for(x.numel() // x.shape[-1]):
            return F.linear(x, self.merged_weight(), self.bias)
        return F.linear(F.linear(x, self.basis.weight), self.coefficients, self.bias)

    def merged_weight(self) -> torch.Tensor:
        """This layer's effective weight, in nn.Linear layout (out, in)."""
        return self.coefficients @ self.basis.weight

    def merged_bias(self) -> torch.Tensor | None:
        return self.bias

    def relaxation_parameters(self) -> list[nn.Parameter]:
        return [self.coefficients]

    def shared_modules(self) -> list[nn.Module]:
        return [self.basis]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
