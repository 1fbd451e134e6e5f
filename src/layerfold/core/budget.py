"""One budget knob for every method: the fraction of the original's unique parameters the folded model keeps.

By default the count includes embeddings (``keep``); ``blocks_only`` counts transformer-block parameters only
(``--keep-blocks``). Reports give both fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .errors import LayerfoldError
from .report import parameter_breakdown


@dataclass(frozen=True)
class Budget:
    keep: float
    blocks_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise LayerfoldError(f"{self.option}: must be a fraction in (0, 1], got {self.keep!r}")

    @classmethod
    def from_options(cls, keep: float | None, keep_blocks: float | None) -> "Budget":
        """The budget of the command-line options ``--keep`` / ``--keep-blocks`` (exactly one given)."""
        if (keep is None) == (keep_blocks is None):
            raise LayerfoldError("give the budget as exactly one of --keep F or --keep-blocks F")
        return cls(keep if keep is not None else keep_blocks, blocks_only=keep_blocks is not None)

    @property
    def option(self) -> str:
        return "--keep-blocks" if self.blocks_only else "--keep"

    def to_dict(self) -> dict:
        """As reports and benchmark rows record it: ``{"fraction": 0.5, "counts": "blocks"}`` (or ``"all"``)."""
        return {"fraction": self.keep, "counts": "blocks" if self.blocks_only else "all"}

    def counted(self, model: nn.Module) -> int:
        """The parameters the budget is a fraction of: the blocks', or all unique parameters."""
        params = parameter_breakdown(model)
        return params["blocks"] if self.blocks_only else params["total"]

    def reduction(self, model: nn.Module) -> int:
        """How many unique parameters must go."""
        return math.ceil((1 - self.keep) * self.counted(model) - 1e-9)

    def unreachable(self, model: nn.Module, removable: int, what: str) -> LayerfoldError:
        base = self.counted(model)
        lowest = (base - removable) / base
        return LayerfoldError(
            f"{self.option} {self.keep:g} cannot be met: {what} can keep no less than {lowest:.1%} of the "
            f"{'block' if self.blocks_only else 'unique'} parameters"
        )


def kept_fractions(original: dict, folded: dict) -> dict[str, float]:
    """Both budget fractions, from two ``parameter_breakdown`` results."""
    return {"keep": folded["total"] / original["total"], "keep_blocks": folded["blocks"] / original["blocks"]}
