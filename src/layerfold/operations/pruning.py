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

from ..core.errors import LayerfoldError
from ..core.families import Family, is_transposed, linear_weight, plain_projection
from .base import Recipe
from .geometry import (
    attention_layout,
    channel_width,
    mlp_paths,
    set_head_counts,
)

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
    like = {"dtype": original.weight.dtype, "device": original.weight.device}
    bias = torch.empty(out_features, **like) if original.bias is not None else None
    smaller = plain_projection(torch.empty(out_features, in_features, **like), bias, transposed=is_transposed(original))
    if original.bias is None:
        smaller.bias = None  # a Conv1D makes one of its own
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
    pruned model's own inputs (``layerfold.engine.sequential``), and is taken as it is."""
    for recipe in unit:
        value = values[recipe.inputs[0]]
        index, transposed = recipe.detail["index"], recipe.detail["transposed"]
        linear = value.t() if transposed and value.dim() == 2 else value
        if recipe.role == "bias":
            result = value.clone()
        elif recipe.role == "rows":
            result = linear[index].clone()
        elif linear.shape[1] == len(index):
            result = linear.clone()
        else:
            gram = context.gram(recipe.detail["layer"], recipe.detail["path"]) if op.compensate and context.gram else None
            result = compensated(linear, index, gram)
        yield recipe.name, (result.t().contiguous() if transposed and result.dim() == 2 else result.contiguous())


def gram_needs(op, paths: list[str]) -> list[tuple[int, str]]:
    return [(i, path) for i in op.layers for path in paths] if op.compensate else []


# ---- plain architecture ----------------------------------------------------------------------------------
def _padded(module: nn.Module, *, rows: int | None = None, columns: int | None = None) -> nn.Module:
    """A copy of a projection grown to ``rows`` outputs or ``columns`` inputs (nn.Linear layout) with zeros."""
    weight = linear_weight(module)
    out_features, in_features = weight.shape
    grown = weight.new_zeros(rows or out_features, columns or in_features)
    grown[:out_features, :in_features] = weight.detach()
    bias = None
    if module.bias is not None:
        bias = module.bias.new_zeros(rows or out_features)
        bias[:out_features] = module.bias.detach()
    return plain_projection(grown, bias, transposed=is_transposed(module))


def _pad_channels(block: nn.Module, family: Family, width: int) -> None:
    """Grow a block's MLP to ``width`` channels with zero ones (exact: a zero reading column adds nothing)."""
    producers, reader = mlp_paths(family)
    own = channel_width(block, family)
    if own == width:
        return
    for path in producers:
        module = block.get_submodule(path)
        fused = (module.weight.shape[1] if is_transposed(module) else module.weight.shape[0]) // own
        if fused != 1:  # Phi-3's gate_up: each stacked half grows
            weight = module.weight.t() if is_transposed(module) else module.weight
            grown = _padded(module, rows=fused * width)
            target = grown.weight.data.t() if is_transposed(grown) else grown.weight.data
            target.copy_(torch.cat([_grow_rows(part, width) for part in weight.detach().split(own)]))
            if module.bias is not None:
                grown.bias.data.copy_(torch.cat([_grow_rows(b, width) for b in module.bias.detach().split(own)]))
            block.set_submodule(path, grown)
        else:
            block.set_submodule(path, _padded(module, rows=width))
    block.set_submodule(reader, _padded(block.get_submodule(reader), columns=width))


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    grown = tensor.new_zeros(rows, *tensor.shape[1:])
    grown[: tensor.shape[0]] = tensor
    return grown


def _pad_heads(block: nn.Module, family: Family, heads: int, kv_heads: int) -> None:
    """Grow a block's attention to ``heads`` heads with zero ones (exact: a zero value and output adds nothing);
    padding adds whole key/value groups of the layer's own group size."""
    layout = attention_layout(family, block, "export")
    if layout.heads == heads and layout.kv_heads == kv_heads:
        return
    if layout.group_size != heads // kv_heads:
        raise LayerfoldError(
            f"a layer keeps {layout.group_size} query heads per key/value head and the export needs "
            f"{heads // kv_heads}: this fold cannot be written as the plain architecture; keep the layerfold checkpoint"
        )
    d = layout.head_dim
    block.set_submodule(layout.q, _padded(block.get_submodule(layout.q), rows=heads * d))
    for path in (layout.k, layout.v):
        block.set_submodule(path, _padded(block.get_submodule(path), rows=kv_heads * d))
    block.set_submodule(layout.o, _padded(block.get_submodule(layout.o), columns=heads * d))
    set_head_counts(layout.module, heads, kv_heads, d)


def plain_widths(model: nn.Module, family: Family) -> None:
    """Make a materialised, pruned model the plain architecture: every layer gets the widest layer's MLP width
    and head count (narrower layers padded with exact zero channels and heads; a uniform fold needs none) and the
    config says so. Fewer heads than the original need a config that states the head size (Llama-like
    ``head_dim``); other families export with their original head count (zero heads fill the rest)."""
    blocks = family.layer_list(model)
    config = model.config
    width = max(channel_width(block, family) for block in blocks)
    for block in blocks:
        _pad_channels(block, family, width)
    field = next((f for f in WIDTH_FIELDS if getattr(config, f, None) is not None), None)
    if field is not None:
        setattr(config, field, width)
    elif family.model_type == "gpt2" and width != 4 * config.n_embd:
        config.n_inner = width
    if family.no_head_pruning:
        return
    layouts = [attention_layout(family, b, "export") for b in blocks]
    original_heads = config.num_attention_heads
    original_kv = getattr(config, "num_key_value_heads", None) or original_heads
    widest = max(layouts, key=lambda lay: lay.heads)
    heads, kv_heads = widest.heads, widest.kv_heads
    if not family.head_size_in_config:
        heads, kv_heads = original_heads, original_kv  # the config cannot state fewer heads of the same size
    for block in blocks:
        _pad_heads(block, family, heads, kv_heads)
    if (heads, kv_heads) != (original_heads, original_kv):
        config.num_attention_heads, config.head_dim = heads, widest.head_dim
        if getattr(config, "num_key_value_heads", None) is not None:
            config.num_key_value_heads = kv_heads
