"""What a ``tie`` operation does: the layers of a group share one weight per projection, held once in the
store under the operation's key; each keeps its own bias, norms and LoRA relaxation.

``build`` makes the modules (empty tensors); ``store_recipe``/``layer_recipe`` say which original tensors each
stored tensor is computed from; ``compute`` computes one unit — a projection's shared weight (and bias) and
every tied layer's relaxation of it — the same in memory and streamed.
"""

from __future__ import annotations

import torch
from torch import nn

from ...families import Family, is_transposed, linear_weight
from ...store import FoldState, ensure_path
from ..base import Recipe
from .modules import SharedProjection, TiedLinear
from .relax import lora_from_delta, resolve_rank
from .spec import Tie


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A tie group's shared tensor: the mean of its sources (computed in float32, stored in their dtype)."""
    if len(tensors) == 1:
        return tensors[0].detach().clone()
    total = torch.stack([t.detach().float() for t in tensors]).mean(dim=0)
    return total.to(tensors[0].dtype)


def relaxation(
    original: torch.Tensor, shared: torch.Tensor, *, transposed: bool, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A, B) of one tied layer: the truncated SVD of its original weight (nn.Linear layout)
    minus the shared weight (in the module's own layout)."""
    shared_weight = shared.t() if transposed else shared
    return lora_from_delta(original.detach() - shared_weight.detach(), rank)


def build(model: nn.Module, family: Family, key: str, op: Tie, state: FoldState) -> None:
    """Replace the shared projections of ``op``'s layers by TiedLinear modules over one SharedProjection each,
    held in ``state[key]``."""
    layers = family.layer_list(model)
    entry = nn.Module()
    for path in family.shared_projections(op.share):
        template = layers[op.layers[0]].get_submodule(path)
        share_bias = op.share_bias and template.bias is not None
        shared = SharedProjection(
            torch.empty_like(template.weight), torch.empty_like(template.bias) if share_bias else None
        )
        ensure_path(entry, path).add_module(path.rsplit(".", 1)[-1], shared)
        for i in op.layers:
            original = layers[i].get_submodule(path)
            tied = TiedLinear(
                shared,
                transposed=is_transposed(original),
                bias=None if shared.bias is not None else original.bias,
                rank=resolve_rank(op.rank_for(path, family.kind_of(path)), tuple(linear_weight(original).shape)),
                dtype=original.weight.dtype,
                device=original.weight.device,
            )
            tied.op_key = key
            layers[i].set_submodule(path, tied)
    state[key] = entry


def store_recipe(name: str, key: str, op: Tie, path: str, attr: str) -> Recipe:
    """A shared weight (or bias): the mean of the sources' tensors."""
    return Recipe(name, "shared", [(i, f"{path}.{attr}") for i in op.sources], key, (path,), {"attr": attr})


def layer_recipe(name: str, key: str, op: Tie, layer: int, path: str, attr: str, module: nn.Module) -> Recipe | None:
    """A tied layer's relaxation factor; its bias (not shared) is copied (None)."""
    if attr not in ("lora_A", "lora_B"):
        return None
    inputs = [(j, f"{path}.weight") for j in op.sources] + [(layer, f"{path}.weight")]
    detail = {"layer": layer, "rank": module.rank, "transposed": module.transposed}
    return Recipe(name, attr, inputs, key, (path,), detail)


def compute(op: Tie, unit: list[Recipe], values: dict, context) -> tuple:
    """One projection of a tie group: its shared tensors first, then each tied layer's relaxation."""
    path = unit[0].unit[0]
    shared = {}
    for recipe in unit:
        if recipe.role == "shared":
            shared[recipe.detail["attr"]] = average([values[k] for k in recipe.inputs])
            yield recipe.name, shared[recipe.detail["attr"]]
    factors: dict[int, tuple] = {}
    for recipe in unit:
        if recipe.role in ("lora_A", "lora_B"):
            i = recipe.detail["layer"]
            if i not in factors:
                weight = values[i, f"{path}.weight"]
                factors[i] = relaxation(
                    weight.t() if recipe.detail["transposed"] else weight,
                    shared["weight"],
                    transposed=recipe.detail["transposed"],
                    rank=recipe.detail["rank"],
                )
            yield recipe.name, factors[i][0 if recipe.role == "lora_A" else 1]


def sync(model: nn.Module, family: Family, key: str, op: Tie, kept: list[int]) -> None:
    """Make ``op`` say the relaxation ranks its layers have, before a save: a PEFT LoRA merged into a tied layer
    (``TiedLinear.add_low_rank``) grows that layer's rank. Per projection, every layer of the group then gets
    the group's largest rank (the others padded with zeros, which changes nothing) — at most the matrix's full
    rank, refactored exactly (SVD of the merged update) where the sum went above it."""
    layers = family.layer_list(model)
    position = {layer: i for i, layer in enumerate(kept)}
    ranks, changed = {}, False
    for path in family.shared_projections(op.share):
        modules = [layers[position[i]].get_submodule(path) for i in op.layers if i in position]
        if not modules or not all(isinstance(m, TiedLinear) for m in modules):
            continue
        limit = min(modules[0].out_features, modules[0].in_features)
        planned = resolve_rank(op.rank_for(path, family.kind_of(path)), (modules[0].out_features, limit))
        for module in modules:
            if module.rank > limit:
                lora_a, lora_b = lora_from_delta(module.lora_B.detach() @ module.lora_A.detach(), limit)
                module.set_relaxation(lora_a, lora_b, trainable=module.lora_A.requires_grad)
        largest = max(module.rank for module in modules)
        for module in modules:
            if module.rank < largest:
                missing = largest - module.rank
                module.add_low_rank(
                    torch.zeros(module.out_features, missing, dtype=module.weight.dtype, device=module.weight.device),
                    torch.zeros(missing, module.in_features, dtype=module.weight.dtype, device=module.weight.device),
                )
        ranks[path] = largest
        changed |= largest != planned
    if changed:
        op.rank = ranks
