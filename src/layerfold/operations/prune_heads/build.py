"""What a ``prune-heads`` operation does: each listed layer's q, k, v and o become smaller projections of the
same kind, and its attention module is told its new head counts; the kept rows and the refitted o columns are
computed by ``operations.pruning``."""

from __future__ import annotations

from torch import nn

from ...core.families import Family, projection_shape
from ...core.store import FoldState
from ..geometry import attention_layout, head_rows, kept_groups, set_head_counts
from ..pruning import compute, layer_recipe, replace_projection  # noqa: F401 (the engine reads them here)
from ..pruning import gram_needs as _gram_needs
from .spec import PruneHeads


def build(model: nn.Module, family: Family, key: str, op: PruneHeads, state: FoldState) -> None:
    blocks = family.layer_list(model)
    for i, keep in zip(op.layers, op.keep):
        block = blocks[i]
        layout = attention_layout(family, block, f"prune-heads layer {i}")
        groups = kept_groups(keep, layout, f"prune-heads layer {i}")
        d = layout.head_dim
        query, kv = head_rows(keep, d), head_rows(groups, d)
        hidden = projection_shape(block.get_submodule(layout.q))[1]
        replace_projection(block, layout.q, key, out_features=len(query), in_features=hidden, rows=query)
        for path in (layout.k, layout.v):
            replace_projection(block, path, key, out_features=len(kv), in_features=hidden, rows=kv)
        out_features, _ = projection_shape(block.get_submodule(layout.o))
        replace_projection(block, layout.o, key, out_features=out_features, in_features=len(query), columns=query)
        set_head_counts(layout.module, len(keep), len(groups), d)


def gram_needs(op: PruneHeads, family: Family) -> list[tuple[int, str]]:
    return _gram_needs(op, [family.attention[3]])
