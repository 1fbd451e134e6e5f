"""The ``prune-heads`` operation: attention heads removed per layer, grouped-query attention respected."""

from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Prune, attention_layout, kept_groups


@dataclass
class PruneHeads(Prune):
    """Each of ``layers`` keeps only the query heads in ``keep``: q and o lose the other heads' rows and columns
    (o refitted with ``compensate``), k and v keep the key/value heads the kept query heads read. With
    grouped-query attention, every kept key/value group keeps the same number of query heads (whole groups go
    when none of their query heads is kept)."""

    kind = "prune-heads"
    unit_name = "head"
    pruned_what = "attention heads"

    def validate(self, family, layers, where: str) -> None:
        layouts = {i: attention_layout(family, layers[i], where) for i in self.layers}
        self.check_widths({i: layout.heads for i, layout in layouts.items()}, where)
        for i in self.layers:
            kept_groups(self.kept(i), layouts[i], f"{where}.keep: layer {i}")

    @classmethod
    def example(cls, model) -> list:
        return [cls(layers=[1], keep=[[0, 1]])]  # one whole key/value group under GQA
