"""Block removal: take layers out of the stack and renumber what the architecture indexes per layer."""

from __future__ import annotations

import torch
from torch import nn

from ..families import Family


def merged_value(target: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """LaCo's Reserving-Differences-while-Seeking-Common merge of one tensor: θ_target + Σ_k (θ_k − θ_target)."""
    base = target.detach()
    return base + sum(source.detach() - base for source in sources)


@torch.no_grad()
def merge_blocks(target: nn.Module, sources: list[nn.Module]) -> None:
    """Merge whole blocks into ``target`` in place (``merged_value`` per parameter)."""
    source_params = [dict(source.named_parameters()) for source in sources]
    for name, param in target.named_parameters():
        param.copy_(merged_value(param, [params[name] for params in source_params]))


def merge_layers(family: Family, model: nn.Module, merges: list[dict]) -> None:
    """Apply a plan's ``merges`` in order."""
    layers = family.layer_list(model)
    for entry in merges:
        merge_blocks(layers[entry["into"]], [layers[i] for i in entry["layers"]])


def drop_layers(model: nn.Module, family: Family, kept: list[int], num_layers: int) -> None:
    if len(kept) == num_layers:
        return
    layers = family.layer_list(model)
    remaining = nn.ModuleList([layers[i] for i in kept])
    family.set_layer_list(model, remaining)
    # The KV cache is indexed by each attention module's layer_idx; it must count kept layers only.
    for position, block in enumerate(remaining):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
