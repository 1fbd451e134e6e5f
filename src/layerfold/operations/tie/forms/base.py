"""What a relaxation form is: how a tied layer position buys back what sharing lost, other than a private LoRA.

A form says which tensors each position stores (``layer_shapes``) and which its group stores once, in the
shared projection of the store (``pool_shapes``); how they change the layer's output (``output``) and weight
(``weight``); which of them ``heal --train relax`` trains (``trainable``, plus the pool); and how they are
fitted to a layer's residual (original − shared weight), data-aware where its form allows: in the space
whitened by each layer's calibration inputs (``fit``), so that they correct outputs rather than weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ....core.errors import LayerfoldError
from ...factor.decompose import whitening_factor

Shapes = dict[str, tuple[int, ...]]


@dataclass(kw_only=True)
class NoOptions:
    """A form without options of its own."""


class Form:
    """A relaxation form. Its ``Options`` dataclass holds what a tie sets for it besides ``rank`` (fields named
    for the plan and the command line: ``--mos-pool`` is ``mos_pool``; ``core.settings.setting`` gives each its
    help); ``check`` is its size rule, ``full_rank`` what ``rank: full`` means for it, ``describe`` its words in a
    plan's description."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --relax's help
    Options: ClassVar[type] = NoOptions
    trainable: ClassVar[tuple[str, ...]] = ()  # the per-position tensors heal's ``--train relax`` trains
    integer: ClassVar[tuple[str, ...]] = ()  # per-position integer tensors (MoS's index maps): stored, never trained
    # Tensors the checkpoint does not store and the form makes again (VeRA's random bases), per projection.
    regenerated: ClassVar[str] = ""

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def of(cls, settings: dict[str, Any]) -> "Form":
        """The form with its options taken from a tie's ``form_options`` (the fields its ``Options`` has)."""
        own = {name: value for name, value in settings.items() if name in cls.Options.__dataclass_fields__}
        return cls(cls.Options(**own))

    def check(self, rank: int, shape: tuple[int, int], where: str) -> None:
        """The sizes this form can take for an (out, in) projection; one line otherwise."""
        if rank > min(shape):
            raise LayerfoldError(f"{where}: rank {rank} is larger than a {shape[0]}x{shape[1]} projection allows "
                                 f"(at most {min(shape)})")  # fmt: skip

    def full_rank(self, shape: tuple[int, int]) -> int:
        """The rank ``rank: full`` means: the largest this form can use."""
        return min(shape)

    def describe(self) -> str:
        """Its options in a plan's description (empty: nothing beyond its name)."""
        return ""

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)

    def layer_shapes(self, rank: int, out_features: int, in_features: int) -> Shapes:
        raise NotImplementedError

    def max_rank(self, out_features: int, in_features: int) -> int:
        """The largest rank worth having (a search for the rank that fills a budget stops there)."""
        return min(out_features, in_features)

    def params(self, rank: int, out_features: int, in_features: int, positions: int) -> int:
        """What the relaxations of one projection over a group of ``positions`` layers store."""
        total = positions * sum(math.prod(s) for s in self.layer_shapes(rank, out_features, in_features).values())
        return total + sum(math.prod(s) for s in self.pool_shapes(rank, out_features, in_features).values())

    def pool_shapes(self, rank: int, out_features: int, in_features: int) -> Shapes:
        return {}

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        """What the relaxation adds to the layer's output for inputs ``x`` (…, in)."""
        raise NotImplementedError

    def weight(self, module) -> torch.Tensor:
        """What the relaxation adds to the layer's weight (out × in)."""
        raise NotImplementedError

    def fit(
        self, residuals: dict[int, torch.Tensor], grams: dict[int, torch.Tensor | None], rank: int, seed: int
    ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        """The pool and each position's tensors (float64) for the residuals Δᵢ = Wᵢ − W (out × in, float64) of
        one projection over a group; ``grams[i]`` the inputs' XᵀX of position i (None: plain, unwhitened)."""
        raise NotImplementedError


def whitened_svd(delta: torch.Tensor, gram: torch.Tensor | None, rank: int, where: str = ""):
    """(U, s, V) with U diag(s) V the best rank-``rank`` approximation of ``delta`` in the norm of its outputs on
    the inputs whose Gram matrix is ``gram`` (the plain SVD without one): U orthonormal (out × r), V (r × in)."""
    if gram is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    whitener = whitening_factor(gram, where)
    u, s, vh = torch.linalg.svd(delta @ whitener, full_matrices=False)
    v = torch.linalg.solve_triangular(whitener, vh[:rank], upper=False, left=False)  # Vᵀ S⁻¹
    return u[:, :rank], s[:rank], v


def inner(left: torch.Tensor, right: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Row-space products ``left · G · rightᵀ`` (plain ``left · rightᵀ`` without a Gram matrix)."""
    return left @ right.T if gram is None else left @ gram @ right.T
