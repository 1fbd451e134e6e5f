"""The ``drop`` operation: remove blocks (ShortGPT, drop-first, drop-even; LaCo's merged-away layers)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Operation, sorted_layers, check_layer_list


@dataclass
class Drop(Operation):
    """The ``layers`` are removed from the stack; the others are renumbered. Drops take effect last: the
    operations before may still read a dropped layer's weights (a merge does)."""

    kind = "drop"

    layers: list[int]

    def __post_init__(self) -> None:
        self.layers = sorted_layers(self.layers)

    def check(self, num_layers: int, where: str) -> None:
        check_layer_list(self.layers, num_layers, f"{where}.layers")

    @classmethod
    def example(cls, model) -> list[Operation]:
        return [cls(layers=[3])]
