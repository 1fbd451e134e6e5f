"""The operations a fold plan is an ordered list of, one folder each: ``spec.py`` (the plan entry: a dataclass
that checks itself) and ``build.py`` (how it changes a model). Registering an operation is one line here; the
plan reads and writes every registered kind by its ``kind`` name."""

from __future__ import annotations

from .base import Operation, Rank
from .drop.spec import Drop
from .factor.spec import Factor
from .merge.spec import Merge
from .tie.spec import Tie

OPERATIONS: dict[str, type[Operation]] = {op.kind: op for op in (Merge, Tie, Factor, Drop)}

__all__ = ["OPERATIONS", "Drop", "Factor", "Merge", "Operation", "Rank", "Tie"]
