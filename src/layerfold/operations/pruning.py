"""What the width operations (``prune-channels``, ``prune-heads``) share: where a block keeps its MLP channels
and attention heads, the smaller projections that replace the pruned ones, the least-squares compensation of
the projection that reads the pruned width, and the plain-architecture config of a uniformly pruned model.

Pruning removes rows of the projections that produce a width (gate/up, or q/k/v) and the matching columns of
the one that reads it (down, or o). The kept channels' values are unchanged by the removal (each MLP channel
and each attention head is computed on its own), so the best reading projection for the kept width is the
least-squares fit of the original's output on the calibration inputs: with G = XᵀX the Gram matrix of the
reading projection's inputs and S the kept columns, W' = (W G[:, S] + λ W[:, S]) (G[S, S] + λI)⁻¹ (MoDeGPT's
Nyström form for the MLP; the ridge term pulls towards the plain cut where the data do not decide).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LayerfoldError
from ..families import Family, is_transposed
from .base import Recipe
from .geometry import HEAD_SIZE_IN_CONFIG, NO_HEAD_PRUNING, attention_layout, channel_width

# λ of the compensation as a fraction of the kept inputs' mean energy (G[S, S]'s mean diagonal).
COMPENSATION_DAMPING = 1e-4
# Config fields that hold the MLP width, by the names the supported families use.
WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


# ---- the modules -----------------------------------------------------------------------------------------
def replace_projection(
    block: nn.Module, path: str, key: str, *, out_features: int, in_features: int, rows=None, columns=None
) -> None:
    """Put a smaller projection of the original's kind (nn.Linear or Conv1D, with a bias if it had one) in place
    of ``path``, its tensors empty; ``rows``/``columns`` are the original's kept ones, for its recipes."""
    original = block.get_submodule(path)
    weight = original.weight
    with torch.device(weight.device):
        if is_transposed(original):
            smaller = Conv1D(out_features, in_features)
        else:
            smaller = nn.Linear(in_features, out_features, bias=original.bias is not None)
    smaller.to(weight.dtype)
    if original.bias is None:
        smaller.bias = None
    smaller.op_key = key
    smaller.pruned_rows, smaller.pruned_columns = rows, columns
    block.set_submodule(path, smaller)


def layer_recipe(name: str, key: str, op, layer: int, path: str, attr: str, module: nn.Module) -> Recipe | None:
    """A pruned projection's kept rows (weight and bias) or compensated columns (weight; its bias is kept as it
    was, by a recipe of this operation: the in-memory fold skips plain copies, and this module is new)."""
    rows, columns = getattr(module, "pruned_rows", None), getattr(module, "pruned_columns", None)
    if rows is not None:
        return Recipe(name, "rows", [(layer, f"{path}.{attr}")], key, (layer,),
                      {"layer": layer, "path": path, "index": rows, "transposed": is_transposed(module)})  # fmt: skip
    if columns is not None and attr == "bias":  # the reading projection's bias stays as it was
        return Recipe(name, "bias", [(layer, f"{path}.{attr}")], key, (layer,), {"index": None, "transposed": False})
    if columns is not None:
        return Recipe(name, "columns", [(layer, f"{path}.{attr}")], key, (layer,),
                      {"layer": layer, "path": path, "index": columns, "transposed": is_transposed(module)})  # fmt: skip
    return None


def compensated(weight: torch.Tensor, columns: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """The reading projection's kept columns (nn.Linear layout), refitted by least squares on the calibration
    inputs' Gram matrix when given (see the module docstring), in the weight's dtype."""
    if gram is None:
        return weight[:, columns].clone()
    g = gram.double()
    kept = g[columns][:, columns].clone()
    damping = COMPENSATION_DAMPING * float(kept.diagonal().mean().clamp(min=1e-12))
    kept.diagonal().add_(damping)
    w = weight.detach().double()
    right = w @ g[:, columns] + damping * w[:, columns]
    return torch.linalg.solve(kept, right.T).T.to(weight.dtype).contiguous()  # kept is symmetric


def compute(op, unit: list[Recipe], values: dict, context) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's pruned projections: rows cut, the reading projection's columns cut and (``op.compensate``)
    refitted. A weight that already has the kept width is the sequential fit's least-squares map from the
    pruned model's own inputs (``layerfold.sequential``), and is taken as it is."""
    for recipe in unit:
        value = values[recipe.inputs[0]]
        index, transposed = recipe.detail["index"], recipe.detail["transposed"]
        linear = value.t() if transposed and value.dim() == 2 else value
        if recipe.role == "bias":
            result = value.clone()
        elif recipe.role == "rows":
            result = linear[index].clone() if linear.dim() == 2 else value[index].clone()
        elif linear.shape[1] == len(index):
            result = linear.clone()
        else:
            gram = context.gram(recipe.detail["layer"], recipe.detail["path"]) if op.compensate and context.gram else None
            result = compensated(linear, index, gram)
        yield recipe.name, (result.t().contiguous() if transposed and result.dim() == 2 else result.contiguous())


def gram_needs(op, paths: list[str]) -> list[tuple[int, str]]:
    return [(i, path) for i in op.layers for path in paths] if op.compensate else []


# ---- plain architecture ----------------------------------------------------------------------------------
def plain_widths(model: nn.Module, family: Family) -> None:
    """Make a materialised model's config describe its pruned widths, so that it saves as the plain
    architecture: every layer must have the same MLP width and head counts, and fewer heads need a config that
    states the head size (Llama-like ``head_dim``). One line otherwise: such a fold stays a layerfold checkpoint."""
    blocks = family.layer_list(model)
    config = model.config
    widths = {channel_width(block, family) for block in blocks}
    if len(widths) > 1:
        raise LayerfoldError(
            f"the MLP widths differ across layers ({min(widths)} to {max(widths)} channels): only a uniform-width "
            "fold (prune with --uniform) exports as the plain architecture; keep the layerfold checkpoint"
        )
    width = widths.pop()
    field = next((f for f in WIDTH_FIELDS if getattr(config, f, None) is not None), None)
    if field is not None and getattr(config, field) != width:
        setattr(config, field, width)
    elif field is None and family.model_type == "gpt2" and width != 4 * config.n_embd:
        config.n_inner = width
    if family.model_type in NO_HEAD_PRUNING:
        return
    layouts = {(lay.heads, lay.kv_heads, lay.head_dim) for lay in (attention_layout(family, b, "export") for b in blocks)}
    if len(layouts) > 1:
        counts = sorted(h for h, _, _ in layouts)
        raise LayerfoldError(
            f"the head counts differ across layers ({counts[0]} to {counts[-1]}): only a uniform-width fold (prune "
            "with --uniform) exports as the plain architecture; keep the layerfold checkpoint"
        )
    heads, kv_heads, head_dim = layouts.pop()
    if heads == config.num_attention_heads and kv_heads == getattr(config, "num_key_value_heads", heads):
        return
    if family.model_type not in HEAD_SIZE_IN_CONFIG:
        raise LayerfoldError(
            f"{config.model_type} derives its head size from the hidden size and the head count, so a plain "
            f"{config.model_type} config cannot have {heads} heads of {head_dim}: keep the layerfold checkpoint"
        )
    config.num_attention_heads, config.head_dim = heads, head_dim
    if getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = kv_heads
