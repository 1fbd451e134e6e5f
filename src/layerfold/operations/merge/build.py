"""What a ``merge`` operation does: LaCo's collapse of whole blocks. It builds no modules of its own: a merge
changes what the engine reads as an original tensor of the layer it merges into (``merged_inputs`` and
``merged_value``), so every operation after it sees the merged weights, in memory and streamed alike."""

from __future__ import annotations

import torch
from torch import nn

from .spec import Merge


def merged_value(target: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """LaCo's Reserving-Differences-while-Seeking-Common merge of one tensor: θ_target + Σ_k (θ_k − θ_target)."""
    base = target.detach()
    return base + sum(source.detach() - base for source in sources)


@torch.no_grad()
def merge_blocks(target: nn.Module, sources: list[nn.Module]) -> None:
    """Merge whole blocks into ``target`` in place (``merged_value`` per parameter); LaCo's planning uses it."""
    source_params = [dict(source.named_parameters()) for source in sources]
    for name, param in target.named_parameters():
        param.copy_(merged_value(param, [params[name] for params in source_params]))


def merged_inputs(key: tuple, merges: list[Merge]) -> set:
    """``key`` (layer, name) and every original tensor its merged value is made of (merges chain: a layer
    merged into another may itself have been merged into before)."""
    layer, name = key
    needed = {key}
    while layer is not None:
        layers = {k[0] for k in needed}
        more = {(i, name) for op in merges if op.into in layers for i in op.layers}
        if more <= needed:
            break
        needed |= more
    return needed
