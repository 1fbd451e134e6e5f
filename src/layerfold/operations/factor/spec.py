"""The ``factor`` operation: Basis Sharing (a group of layers) or per-layer (whitened) SVD truncation."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import LayerfoldError
from ...core.families import linear_weight
from ..base import Operation, sorted_layers, check_bool, check_layer_list, check_rank


@dataclass
class Factor(Operation):
    """``projection`` of each of ``layers`` becomes ``coefficients_i @ basis`` with one rank-``rank`` basis
    (held once in the store) shared by the listed layers, or for a single layer its own truncated SVD. With
    ``whiten`` the SVD is of the weights whitened by the Cholesky factor of their inputs' Gram matrix (needs
    calibration data). The rank is stored so that a checkpoint rebuilds without calibration data."""

    kind = "factor"

    layers: list[int]
    projection: str
    rank: int
    whiten: bool = True

    def __post_init__(self) -> None:
        self.layers = sorted_layers(self.layers)

    keeps_architecture = False

    def calibration_steps(self) -> list[str]:
        return ["whitened factorisations"] if self.whiten else []

    @classmethod
    def describe(cls, operations: list["Factor"]) -> list[str]:
        shared = sum(1 for f in operations if len(f.layers) > 1)
        whitened = {f.whiten for f in operations}
        note = ", whitened" if whitened == {True} else ", some whitened" if len(whitened) > 1 else ""
        return [f"{len(operations)} low-rank factorisations ({shared} with a basis shared across layers{note})"]

    def check(self, num_layers: int, where: str) -> None:
        check_layer_list(self.layers, num_layers, f"{where}.layers")
        if not isinstance(self.projection, str) or not self.projection:
            raise LayerfoldError(f"{where}.projection: must be a projection path such as self_attn.q_proj")
        check_rank(self.rank, f"{where}.rank", minimum=1, full=False)
        check_bool(self.whiten, f"{where}.whiten")

    def validate(self, family, layers, where: str) -> None:
        if self.projection not in family.projections:
            raise LayerfoldError(
                f"{where}.projection: {self.projection!r} is not a projection of "
                f"{family.model_type} (one of: {', '.join(family.projections)})"
            )
        out_features, in_features = linear_weight(layers[self.layers[0]].get_submodule(self.projection)).shape
        limit = min(out_features * len(self.layers), in_features)
        if self.rank > limit:
            raise LayerfoldError(
                f"{where}.rank: {self.rank} is larger than {self.projection} of "
                f"{len(self.layers)} layer(s) allows (at most {limit})"
            )

    @classmethod
    def example(cls, model) -> list[Operation]:
        from ...core.families import family_of

        return [cls(layers=[0, 1], projection=family_of(model).projections[0], rank=4)]
