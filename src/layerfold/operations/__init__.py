"""The operations a fold plan is an ordered list of: each one file (the plan entry — a dataclass that checks and
describes itself —, the modules it puts in a model, if any, and its build functions: how it builds them, which
original tensors each stored tensor is computed from, and the computation), or, once it outgrows a file, a
folder of ``spec.py``, ``modules.py`` and ``build.py`` (the engine finds ``build.py`` beside the spec).
Registering an operation is one line here; the plan reads and writes every registered kind by its ``kind``
name."""

from __future__ import annotations

from .base import Operation, Rank, Recipe
from .drop.spec import Drop
from .factor.spec import Factor
from .merge.spec import Merge
from .prune_channels.spec import PruneChannels
from .prune_heads.spec import PruneHeads
from .tie.spec import Tie

# The order is the order a plan's description lists them in.
OPERATIONS: dict[str, type[Operation]] = {op.kind: op for op in (Tie, Merge, Factor, PruneChannels, PruneHeads, Drop)}

__all__ = ["OPERATIONS", "Drop", "Factor", "Merge", "Operation", "PruneChannels", "PruneHeads", "Rank", "Recipe", "Tie"]
