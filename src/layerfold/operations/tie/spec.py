"""The ``tie`` operation: Relaxed Recursive Transformers' layer tying with a per-layer LoRA relaxation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import LayerfoldError
from ...families import ATTENTION, MLP, linear_weight
from ..base import Operation, Rank, check_bool, check_layer_list, check_rank, sorted_layers

SHARE_CHOICES = ("all", ATTENTION, MLP)
FIT_CHOICES = ("mean", "lstsq")


@dataclass
class Tie(Operation):
    """The ``layers`` (two or more) share one weight per projection named by ``share`` (``all``, ``attention``
    or ``mlp``), held once in the store. The shared weight is fitted to the ``sources`` layers (by default the
    group's own layers): ``fit="mean"``, the mean of their weights; ``fit="lstsq"``, the weight whose outputs
    on each source's calibration inputs are closest to that layer's own (least squares over their Gram
    matrices; needs calibration data). Each layer keeps its bias (unless ``share_bias``), norms and a LoRA
    relaxation of ``rank`` initialised from the truncated SVD of (original − shared) — with ``whiten``, in the
    space whitened by that layer's inputs, so that it corrects the layer's outputs rather than its weights.
    ``rank``: 0 for none, an int, ``"full"`` (exact), or a mapping from a projection kind
    (``attention``/``mlp``), name (``q_proj``) or path (``self_attn.q_proj``) to a rank."""

    kind = "tie"

    layers: list[int]
    share: str = "all"
    sources: list[int] = field(default_factory=list)
    rank: Rank | dict[str, Rank] = 0
    share_bias: bool = False
    fit: str = "mean"
    whiten: bool = False

    def __post_init__(self) -> None:
        self.layers = sorted_layers(self.layers)
        if isinstance(self.sources, (list, tuple)) and not self.sources and isinstance(self.layers, list):
            self.sources = list(self.layers)  # the default: the mean of the group's own layers

    def check(self, num_layers: int, where: str) -> None:
        check_layer_list(self.layers, num_layers, f"{where}.layers", minimum=2)
        if self.share not in SHARE_CHOICES:
            raise LayerfoldError(f"{where}.share: must be one of {', '.join(SHARE_CHOICES)}, got {self.share!r}")
        check_layer_list(self.sources, num_layers, f"{where}.sources")
        ranks = self.rank.items() if isinstance(self.rank, dict) else [(None, self.rank)]
        for key, value in ranks:
            check_rank(value, f"{where}.rank" if key is None else f"{where}.rank[{key!r}]")
        check_bool(self.share_bias, f"{where}.share_bias")
        if self.fit not in FIT_CHOICES:
            raise LayerfoldError(f"{where}.fit: must be one of {', '.join(FIT_CHOICES)}, got {self.fit!r}")
        check_bool(self.whiten, f"{where}.whiten")

    def needs_calibration(self) -> bool:
        """Whether computing this tie needs its layers' calibration Gram matrices."""
        return self.fit == "lstsq" or self.whiten

    def rank_for(self, projection: str, kind: str) -> Rank:
        """The relaxation rank of one projection (path relative to a block, e.g. ``self_attn.q_proj``)."""
        if not isinstance(self.rank, dict):
            return self.rank
        leaf = projection.rsplit(".", 1)[-1]
        for key in (projection, leaf, kind):
            if key in self.rank:
                return self.rank[key]
        return 0

    def validate(self, family, layers, where: str) -> None:
        if isinstance(self.rank, dict):
            allowed = {ATTENTION, MLP} | set(family.projections) | {p.rsplit(".", 1)[-1] for p in family.projections}
            for key in self.rank:
                if key not in allowed:
                    raise LayerfoldError(
                        f"{where}.rank[{key!r}]: unknown projection for {family.model_type} "
                        f"(use one of: {', '.join(sorted(allowed))})"
                    )
        block = layers[self.layers[0]]
        for projection in family.shared_projections(self.share):
            rank = self.rank_for(projection, family.kind_of(projection))
            out_features, in_features = linear_weight(block.get_submodule(projection)).shape
            if rank != "full" and rank > min(out_features, in_features):
                raise LayerfoldError(
                    f"{where}.rank: rank {rank} is larger than {projection} allows "
                    f"({out_features}x{in_features}, at most {min(out_features, in_features)})"
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["rank"] = dict(self.rank) if isinstance(self.rank, dict) else self.rank
        return data


def init_sources(groups: list[list[int]], init: str) -> list[list[int]]:
    """Each tie group's ``sources`` for an ``init`` choice: ``average`` (or ``lstsq``) of its own layers;
    ``lower``, the g-th lowest tied layer for the g-th group (ordered by first layer; Relaxed Recursive
    Transformers' "Lower"); ``stepwise``, evenly spaced tied layers ("Stepwise")."""
    if init in ("average", "lstsq"):
        return [sorted(g) for g in groups]
    order = sorted(range(len(groups)), key=lambda g: min(groups[g]))
    pool = sorted(i for g in groups for i in g)
    sources: list[list[int]] = [[] for _ in groups]
    for position_in_order, g in enumerate(order):
        position = position_in_order if init == "lower" else (position_in_order * len(pool)) // len(groups)
        sources[g] = [pool[position]]
    return sources
