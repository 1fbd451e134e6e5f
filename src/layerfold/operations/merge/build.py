"""Building ``merge`` operations: LaCo's collapse of whole blocks, in place, before anything else reads them."""

from __future__ import annotations

import torch
from torch import nn

from ...families import Family
from .spec import Merge


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


def merge_layers(model: nn.Module, family: Family, merges: list[Merge]) -> None:
    """Apply ``merge`` operations in order."""
    layers = family.layer_list(model)
    for op in merges:
        merge_blocks(layers[op.into], [layers[i] for i in op.layers])
