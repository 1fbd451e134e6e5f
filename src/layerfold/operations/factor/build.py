"""What a ``factor`` operation does: one projection of its layers becomes BasisLinear modules over one basis,
held once in the store under the operation's key. ``compute`` decomposes the (whitened) stacked weights and
yields the basis and each layer's coefficients — the same in memory and streamed."""

from __future__ import annotations

import torch
from torch import nn

from ...core.families import Family, is_transposed, linear_weight
from ...core.store import FoldState
from ..base import Recipe
from .decompose import cached_decomposition
from .modules import BasisLinear, SharedBasis
from .spec import Factor


def build(model: nn.Module, family: Family, key: str, op: Factor, state: FoldState) -> None:
    layers = family.layer_list(model)
    originals = [layers[i].get_submodule(op.projection) for i in op.layers]
    template = linear_weight(originals[0])
    dtype, device = template.dtype, template.device
    basis = SharedBasis(torch.empty(op.rank, template.shape[1], dtype=dtype, device=device))
    state[key] = basis
    for i, original in zip(op.layers, originals):
        coefficients = torch.empty(template.shape[0], op.rank, dtype=dtype, device=device)
        module = BasisLinear(basis, coefficients, original.bias, transposed=is_transposed(original))
        module.op_key = key
        layers[i].set_submodule(op.projection, module)


def store_recipe(name: str, key: str, op: Factor, path: str, attr: str, module: nn.Module) -> Recipe:
    return Recipe(name, "basis", [(i, f"{op.projection}.weight") for i in op.layers], key)


def layer_recipe(
    name: str, key: str, op: Factor, layer: int, path: str, attr: str, module: nn.Module
) -> Recipe | None:
    """A layer's coefficients; its bias is copied (None)."""
    if attr != "coefficients":
        return None
    inputs = [(j, f"{op.projection}.weight") for j in op.layers]
    return Recipe(name, "coefficients", inputs, key, (), {"layer": layer, "transposed": module.transposed})


def gram_needs(op: Factor, family: Family) -> list[tuple[int, str]]:
    return [(i, op.projection) for i in op.layers] if op.whiten else []


def compute(op: Factor, unit: list[Recipe], values: dict, context) -> tuple:
    transposed = next((r.detail["transposed"] for r in unit if r.role == "coefficients"), False)
    stored = [values[i, f"{op.projection}.weight"] for i in op.layers]
    decomposition = cached_decomposition(
        op.layers,
        op.projection,
        lambda: [w.t() if transposed else w for w in stored],
        context.gram if op.whiten else None,
        context.cache,
    )
    basis, coefficients = decomposition.factors(op.rank, stored[0].dtype)
    for recipe in unit:
        if recipe.role == "basis":
            yield recipe.name, basis
        else:
            yield recipe.name, coefficients[op.layers.index(recipe.detail["layer"])]
