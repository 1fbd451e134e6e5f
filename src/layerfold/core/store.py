"""The store of a folded model: every tensor shared across layers, held once, by the name of the operation
that made it. It sits at ``model.base_model.layerfold_shared``; the layers only point at its entries.
"""

from __future__ import annotations

from typing import Any

from torch import nn

STATE_ATTRIBUTE = "layerfold_shared"
# The checkpoint format: 1 (layerfold 0.1) named the store's entries by position; 2 by operation key.
FORMAT_VERSION = 2
FORMAT_KEY = "layerfold_format"


class FoldState(nn.ModuleDict):
    """The shared weights of a folded model and how it was made, keyed by the plan's operation keys
    (``tie_0``, ``factor_3``: see ``FoldPlan.keyed``); checkpoint tensor names follow the keys
    (``<base model>.layerfold_shared.tie_0.self_attn.q_proj.weight``)."""

    def __init__(self, plan: Any, base_config: dict, base_architecture: str) -> None:
        super().__init__()
        self.plan = plan
        self.base_config = base_config
        self.base_architecture = base_architecture


def fold_state(model: nn.Module) -> FoldState | None:
    base = getattr(model, "base_model", model)
    return getattr(base, STATE_ATTRIBUTE, None)


def ensure_path(root: nn.Module, path: str) -> nn.Module:
    """Create empty container modules along ``path`` below ``root`` and return the last one's parent."""
    parent = root
    for name in path.split(".")[:-1]:
        if not hasattr(parent, name):
            parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    return parent
