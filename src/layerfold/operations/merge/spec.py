"""The ``merge`` operation: LaCo's Reserving-Differences-while-Seeking-Common layer collapse."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Operation, check_layer, check_layer_list


@dataclass
class Merge(Operation):
    """Set layer ``into``'s parameters to θ_into + Σ_k (θ_k − θ_into) over ``layers``, which a ``drop`` must
    remove. Merges apply in plan order (one may merge a layer that an earlier merge filled), before any tie or
    factorisation reads the weights."""

    kind = "merge"

    into: int
    layers: list[int]

    @classmethod
    def describe(cls, operations: list["Merge"]) -> list[str]:
        return [f"{len(operations)} LaCo merges"]

    def check(self, num_layers: int, where: str) -> None:
        check_layer(self.into, num_layers, f"{where}.into")
        check_layer_list(self.layers, num_layers, f"{where}.layers")

    @classmethod
    def example(cls, model) -> list[Operation]:
        from ..drop.spec import Drop

        return [cls(into=1, layers=[2]), Drop(layers=[2])]  # a merge needs the drop that removes the merged-away layer
