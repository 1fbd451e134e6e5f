"""Building a ``factor`` operation in a model: BasisLinear projections over a basis held in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import LayerfoldError
from ...families import Family, is_transposed, linear_weight
from ...store import FoldState
from .decompose import group_decomposition
from .modules import BasisLinear, SharedBasis
from .spec import Factor

if TYPE_CHECKING:
    from ...calibrate import Statistics


def factorize_layers(
    model: nn.Module,
    family: Family,
    factors: list[tuple[str, Factor]],
    state: FoldState,
    *,
    initialize: bool,
    statistics: Statistics | None = None,
    progress: bool = False,
) -> None:
    """Replace the projection of every ``factor`` operation (with its store key) by BasisLinear modules over
    one basis, held in ``state`` under the key. With ``initialize=False`` only the structure is built (empty
    tensors, e.g. on the meta device) for a checkpoint's weights to be loaded into."""
    if initialize and statistics is None and any(op.whiten for _, op in factors):
        raise LayerfoldError("a whitened factorisation needs calibration data (--calib PATH)")
    layers = family.layer_list(model)
    for key, op in tqdm(factors, desc="factorising", unit="matrix", disable=not progress or not factors):
        originals = [layers[i].get_submodule(op.projection) for i in op.layers]
        template = linear_weight(originals[0])
        dtype, device = template.dtype, template.device
        if initialize:
            decomposition = group_decomposition(model, op.layers, op.projection, statistics if op.whiten else None)
            basis_weight, coefficients = decomposition.factors(op.rank, dtype)
            basis = SharedBasis(basis_weight)
        else:
            basis = SharedBasis(torch.empty(op.rank, template.shape[1], dtype=dtype, device=device))
            coefficients = [torch.empty(template.shape[0], op.rank, dtype=dtype, device=device) for _ in op.layers]
        state[key] = basis
        for i, original, coefficient in zip(op.layers, originals, coefficients):
            module = BasisLinear(basis, coefficient, original.bias, transposed=is_transposed(original))
            layers[i].set_submodule(op.projection, module)
