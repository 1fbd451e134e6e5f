"""Where a block keeps the widths that ``prune-channels`` and ``prune-heads`` cut: its MLP channels (the
projections that produce them and the one that reads them) and its attention heads (the q, k, v, o
projections, the head size, grouped-query groups). The plan's checks read it, so it sits with the specs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.errors import LayerfoldError
from ..core.families import FAMILIES, Family, projection_shape
from .base import Operation, check_bool, check_layer_list, sorted_layers


def mlp_paths(family: Family) -> tuple[tuple[str, ...], str]:
    """The projections that produce the MLP's channels (gate and up; GPT-2's c_fc) and the one that reads
    them (down), for every supported family: the reading one is the MLP's last projection."""
    return family.mlp[:-1], family.mlp[-1]


def channel_width(block: nn.Module, family: Family) -> int:
    """The number of MLP channels of a block (the reading projection's inputs)."""
    return projection_shape(block.get_submodule(mlp_paths(family)[1]))[1]


def channel_rows(keep: list[int], width: int, fused: int) -> torch.Tensor:
    """A producing projection's rows for the kept channels; a fused gate_up (Phi-3) holds ``fused`` stacked
    blocks of ``width`` rows, each cut the same way."""
    kept = torch.tensor(keep, dtype=torch.long)
    return torch.cat([kept + k * width for k in range(fused)])


# Which families' attention can lose heads and which configs state the head size are family facts
# (``Family.no_head_pruning``, ``Family.head_size_in_config``); these views by model type are kept for callers.
NO_HEAD_PRUNING = {name: family.no_head_pruning for name, family in FAMILIES.items() if family.no_head_pruning}
HEAD_SIZE_IN_CONFIG = {name for name, family in FAMILIES.items() if family.head_size_in_config}


@dataclass(frozen=True)
class AttentionLayout:
    """One block's attention: its module, the q, k, v, o paths and its head geometry."""

    module: nn.Module
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads


def attention_layout(family: Family, block: nn.Module, where: str) -> AttentionLayout:
    if family.no_head_pruning:
        raise LayerfoldError(f"{where}: prune-heads cannot prune {family.model_type}: {family.no_head_pruning}")
    q, k, v, o = family.attention
    module = block.get_submodule(q.rpartition(".")[0])
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise LayerfoldError(f"{where}: cannot tell the head size of {type(module).__name__}")
    q_out, k_out = projection_shape(block.get_submodule(q))[0], projection_shape(block.get_submodule(k))[0]
    return AttentionLayout(module, q, k, v, o, head_dim, q_out // head_dim, k_out // head_dim)


def kept_groups(keep: list[int], layout: AttentionLayout, where: str) -> list[int]:
    """The key/value heads the kept query heads read; grouped-query attention needs each of them to keep the
    same number of query heads (one repeat count per layer)."""
    g = layout.group_size
    counts: dict[int, int] = {}
    for h in keep:
        counts[h // g] = counts.get(h // g, 0) + 1
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{n} of group {group}" for group, n in sorted(counts.items()))
        raise LayerfoldError(
            f"{where}: grouped-query attention needs the same number of query heads in every kept key/value group "
            f"(groups of {g}); this keeps {detail}"
        )
    return sorted(counts)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def set_head_counts(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Tell an attention module its new head counts, under whichever names its family reads them."""
    values = {
        "num_heads": heads,
        "num_attention_heads": heads,
        "all_head_size": heads * head_dim,
        "num_key_value_heads": kv_heads,
        "num_key_value_groups": heads // kv_heads,
    }
    for name, value in values.items():
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


@dataclass
class Prune(Operation):
    """What both width operations are: ``layers`` and, for each, the sorted indices it ``keep``s (channels or
    query heads of that original layer); with ``compensate``, the projection that reads the pruned width is
    refitted by least squares on calibration inputs (needs calibration data)."""

    layers: list[int]
    keep: list[list[int]]
    compensate: bool = True

    unit_name: ClassVar[str] = ""  # what an index counts, for messages
    pruned_what: ClassVar[str] = ""  # what the layers lose, for descriptions

    def __post_init__(self) -> None:
        if isinstance(self.layers, (list, tuple)) and isinstance(self.keep, (list, tuple)):
            keep = [sorted(k) if isinstance(k, (list, tuple)) and all(isinstance(i, int) for i in k) else k
                    for k in self.keep]  # fmt: skip
            if len(keep) == len(self.layers) and all(isinstance(i, int) for i in self.layers):
                pairs = sorted(zip(self.layers, keep), key=lambda pair: pair[0])
                self.layers, self.keep = [i for i, _ in pairs], [k for _, k in pairs]
            else:
                self.layers, self.keep = sorted_layers(self.layers), keep

    def calibration_steps(self) -> list[str]:
        return ["compensated pruning"] if self.compensate else []

    @classmethod
    def describe(cls, operations: list["Prune"]) -> list[str]:
        kept = [len(k) for op in operations for k in op.keep]
        span = f"{min(kept)}" if min(kept) == max(kept) else f"{min(kept)} to {max(kept)}"
        compensated = ", compensated" if all(op.compensate for op in operations) else ""
        return [f"{cls.pruned_what} pruned in {len(kept)} layers ({span} kept{compensated})"]

    def kept(self, layer: int) -> list[int]:
        return self.keep[self.layers.index(layer)]

    def check(self, num_layers: int, where: str) -> None:
        check_layer_list(self.layers, num_layers, f"{where}.layers")
        if not isinstance(self.keep, list) or len(self.keep) != len(self.layers):
            raise LayerfoldError(f"{where}.keep: must be one list of kept {self.unit_name}s per listed layer")
        for i, kept in zip(self.layers, self.keep):
            if not isinstance(kept, list) or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in kept):
                raise LayerfoldError(f"{where}.keep: layer {i}'s must be a list of {self.unit_name} indices, got {kept!r}")
            if not kept:
                raise LayerfoldError(
                    f"{where}.keep: layer {i} would lose every {self.unit_name}; keep at least one (or drop the layer)"
                )
            if len(set(kept)) != len(kept):
                raise LayerfoldError(f"{where}.keep: layer {i} lists a {self.unit_name} twice")
        check_bool(self.compensate, f"{where}.compensate")

    def check_widths(self, widths: dict[int, int], where: str) -> None:
        for i, kept in zip(self.layers, self.keep):
            if kept[-1] >= widths[i]:
                raise LayerfoldError(
                    f"{where}.keep: layer {i} has {widths[i]} {self.unit_name}s; index {kept[-1]} is out of range"
                )
