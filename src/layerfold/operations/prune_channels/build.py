"""What a ``prune-channels`` operation does: each listed layer's MLP projections become smaller ones of the same
kind (plain nn.Linear or Conv1D), their kept rows and columns computed by ``operations.pruning``."""

from __future__ import annotations

from torch import nn

from ...core.families import Family, projection_shape
from ...core.store import FoldState
from ..geometry import channel_rows, channel_width, mlp_paths
from ..pruning import compute, layer_recipe, replace_projection  # noqa: F401 (the engine reads them here)
from ..pruning import gram_needs as _gram_needs
from .spec import PruneChannels


def build(model: nn.Module, family: Family, key: str, op: PruneChannels, state: FoldState) -> None:
    producers, reader = mlp_paths(family)
    blocks = family.layer_list(model)
    for i, keep in zip(op.layers, op.keep):
        block = blocks[i]
        width = channel_width(block, family)
        for path in producers:
            out_features, in_features = projection_shape(block.get_submodule(path))
            fused = out_features // width  # Phi-3's gate_up_proj stacks two
            rows = channel_rows(keep, width, fused)
            replace_projection(block, path, key, out_features=len(rows), in_features=in_features, rows=rows)
        out_features, _ = projection_shape(block.get_submodule(reader))
        replace_projection(block, reader, key, out_features=out_features, in_features=len(keep),
                           columns=channel_rows(keep, width, 1))  # fmt: skip


def gram_needs(op: PruneChannels, family: Family) -> list[tuple[int, str]]:
    return _gram_needs(op, [mlp_paths(family)[1]])
