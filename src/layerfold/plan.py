"""FoldPlan: which layers are dropped, which are tied into groups, what is shared and how it is relaxed.

A plan is plain data that round-trips through JSON and YAML. Layer indices always refer to the original
model's layers (0 .. num_layers-1). Layers that are neither dropped nor in a group of two or more stay unique.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import LayerfoldError
from .families import ATTENTION, MLP, family_of, linear_weight

Rank = Union[int, str]  # an int >= 0 or "full"
SHARE_CHOICES = ("all", ATTENTION, MLP)
INIT_CHOICES = ("average", "stepwise", "lower")


@dataclass
class FoldPlan:
    """How to fold an L-layer model.

    - ``groups``: lists of original layer indices; the layers of a group share one set of projection weights.
    - ``drop``: original layer indices removed from the model.
    - ``share``: which projections a group shares: ``all``, ``attention`` or ``mlp``.
    - ``init``: how a group's shared weights start: ``average`` of its members; ``lower``, the weights of the
      g-th lowest tied layer for the g-th group (Relaxed Recursive Transformers' "Lower"); ``stepwise``, of
      evenly spaced tied layers ("Stepwise").
    - ``rank``: per-layer LoRA relaxation of every shared projection, initialised from the truncated SVD of
      (original - shared): 0 for none, an int, ``"full"`` (exact), or a dict from a projection kind
      (``attention``/``mlp``), a projection name (``q_proj``) or path (``self_attn.q_proj``) to a rank.
    - ``share_bias``: tie biases too (by default every layer keeps its own).
    - ``merges``: LaCo-style layer collapses, applied in order before dropping: ``{"into": l, "layers": [...]}``
      sets layer l's parameters to θ_l + Σ_k (θ_k − θ_l) over the listed layers, which must also be in ``drop``.
    - ``factors``: low-rank factorisations, each ``{"layers": [...], "projection": path, "rank": k}``: the
      projection of those layers becomes ``coefficients_i @ basis`` with one rank-k basis shared by the
      listed layers (Basis Sharing) or, for a single layer, its own truncated SVD. k is stored so that a
      checkpoint can be rebuilt without calibration data.
    - ``whiten``: factorisations start from the SVD of the weights whitened by the Cholesky factor of their
      inputs' Gram matrix (needs calibration data), not of the bare weights.
    - ``provenance``: free-form record of how the plan was made (method, budget, calibration); not used to
      rebuild the model.
    """

    num_layers: int
    groups: list[list[int]] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    share: str = "all"
    init: str = "average"
    rank: Rank | dict[str, Rank] = 0
    share_bias: bool = False
    merges: list[dict[str, Any]] = field(default_factory=list)
    factors: list[dict[str, Any]] = field(default_factory=list)
    whiten: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def identity(cls, num_layers: int) -> "FoldPlan":
        return cls(num_layers=num_layers)

    @classmethod
    def cycle(cls, num_layers: int, unique: int, **options: Any) -> "FoldPlan":
        """Layer i uses unique block i mod K (the model loops K blocks)."""
        _check_unique(num_layers, unique, minimum=1)
        groups = [list(range(k, num_layers, unique)) for k in range(unique)]
        return cls(num_layers=num_layers, groups=_tied(groups), **options)

    @classmethod
    def sequence(cls, num_layers: int, unique: int, **options: Any) -> "FoldPlan":
        """Consecutive layers share: K contiguous runs as equal as possible (longer runs first)."""
        _check_unique(num_layers, unique, minimum=1)
        size, extra = divmod(num_layers, unique)
        groups, start = [], 0
        for k in range(unique):
            end = start + size + (1 if k < extra else 0)
            groups.append(list(range(start, end)))
            start = end
        return cls(num_layers=num_layers, groups=_tied(groups), **options)

    @classmethod
    def middle_cycle(cls, num_layers: int, unique: int, **options: Any) -> "FoldPlan":
        """First and last layers stay unique; the middle layers cycle over the remaining K-2 blocks."""
        _check_unique(num_layers, unique, minimum=3)
        groups = [list(range(1 + k, num_layers - 1, unique - 2)) for k in range(unique - 2)]
        return cls(num_layers=num_layers, groups=_tied(groups), **options)

    @classmethod
    def from_groups(
        cls,
        groups: list[list[int]],
        drop: list[int] | tuple[int, ...] = (),
        *,
        num_layers: int | None = None,
        **options: Any,
    ) -> "FoldPlan":
        groups = [sorted(int(i) for i in g) for g in groups]
        drop = sorted(int(i) for i in drop)
        if num_layers is None:
            indices = [i for g in groups for i in g] + drop
            if not indices:
                raise LayerfoldError("plan: from_groups needs num_layers when no groups or drops are given")
            num_layers = max(indices) + 1
        return cls(num_layers=num_layers, groups=groups, drop=drop, **options)

    # ---- derived views ------------------------------------------------------------------------------
    def kept_layers(self) -> list[int]:
        dropped = set(self.drop)
        return [i for i in range(self.num_layers) if i not in dropped]

    def tie_groups(self) -> list[tuple[int, list[int]]]:
        """(index into ``groups``, members) for the groups that really share (two or more members)."""
        return [(g, sorted(members)) for g, members in enumerate(self.groups) if len(members) >= 2]

    def init_sources(self) -> dict[int, list[int]]:
        """For each tie group (by index into ``groups``), the original layers its shared weights start from."""
        tied = sorted(self.tie_groups(), key=lambda item: item[1][0])
        if self.init == "average":
            return {g: members for g, members in tied}
        pool = sorted(i for _, members in tied for i in members)
        sources = {}
        for order, (g, _) in enumerate(tied):
            position = order if self.init == "lower" else (order * len(pool)) // len(tied)
            sources[g] = [pool[position]]
        return sources

    def rank_for(self, projection: str, kind: str) -> Rank:
        """The relaxation rank of one projection (path relative to a block, e.g. ``self_attn.q_proj``)."""
        if not isinstance(self.rank, dict):
            return self.rank
        leaf = projection.rsplit(".", 1)[-1]
        for key in (projection, leaf, kind):
            if key in self.rank:
                return self.rank[key]
        return 0

    def factored(self) -> dict[tuple[int, str], int]:
        """(layer, projection) -> index into ``factors``."""
        return {(i, f["projection"]): n for n, f in enumerate(self.factors) for i in f["layers"]}

    def unique_blocks(self) -> int:
        """How many distinct sets of shared projections the folded model has."""
        grouped = {i for _, members in self.tie_groups() for i in members}
        return len(self.tie_groups()) + sum(1 for i in self.kept_layers() if i not in grouped)

    def describe(self) -> str:
        parts = [f"{self.num_layers} layers -> {len(self.kept_layers())} kept, {self.unique_blocks()} unique blocks"]
        if self.tie_groups():
            parts.append(f"share={self.share}, init={self.init}, rank={self.rank}")
        if self.merges:
            parts.append(f"{len(self.merges)} LaCo merges")
        if self.factors:
            shared = sum(1 for f in self.factors if len(f["layers"]) > 1)
            parts.append(
                f"{len(self.factors)} low-rank factorisations ({shared} with a basis shared across layers"
                f"{', whitened' if self.whiten else ''})"
            )
        if self.provenance.get("method"):
            parts.append(f"method={self.provenance['method']}")
        return "; ".join(parts)

    # ---- checks ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Reject plans that are impossible for any model; the message names the offending field."""
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise LayerfoldError(f"plan.num_layers: must be a positive integer, got {self.num_layers!r}")
        if self.share not in SHARE_CHOICES:
            raise LayerfoldError(f"plan.share: must be one of {', '.join(SHARE_CHOICES)}, got {self.share!r}")
        if self.init not in INIT_CHOICES:
            raise LayerfoldError(f"plan.init: must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if not isinstance(self.share_bias, bool):
            raise LayerfoldError(f"plan.share_bias: must be true or false, got {self.share_bias!r}")
        seen_drop = set()
        for i in self.drop:
            self._check_index(i, "plan.drop")
            if i in seen_drop:
                raise LayerfoldError(f"plan.drop: layer {i} is listed twice")
            seen_drop.add(i)
        if len(seen_drop) == self.num_layers:
            raise LayerfoldError(f"plan.drop: drops all {self.num_layers} layers; at least one must stay")
        owner: dict[int, int] = {}
        for g, members in enumerate(self.groups):
            where = f"plan.groups[{g}]"
            if not isinstance(members, (list, tuple)) or not members:
                raise LayerfoldError(f"{where}: must be a non-empty list of layer indices, got {members!r}")
            for i in members:
                self._check_index(i, where)
                if i in seen_drop:
                    raise LayerfoldError(f"{where}: layer {i} is also in plan.drop")
                if i in owner:
                    if owner[i] == g:
                        raise LayerfoldError(f"{where}: layer {i} is listed twice")
                    raise LayerfoldError(f"{where}: layer {i} is already in plan.groups[{owner[i]}]")
                owner[i] = g
        ranks = self.rank.items() if isinstance(self.rank, dict) else [(None, self.rank)]
        for key, value in ranks:
            where = "plan.rank" if key is None else f"plan.rank[{key!r}]"
            if value == "full":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LayerfoldError(f"{where}: must be 0, a positive integer or 'full', got {value!r}")
        if not isinstance(self.whiten, bool):
            raise LayerfoldError(f"plan.whiten: must be true or false, got {self.whiten!r}")
        if not isinstance(self.provenance, dict):
            raise LayerfoldError(f"plan.provenance: must be a mapping, got {self.provenance!r}")
        if not isinstance(self.merges, list):
            raise LayerfoldError(f"plan.merges: must be a list, got {self.merges!r}")
        for n, entry in enumerate(self.merges):
            where = f"plan.merges[{n}]"
            if not isinstance(entry, dict) or set(entry) != {"into", "layers"}:
                raise LayerfoldError(f"{where}: must be a mapping with exactly into and layers")
            self._check_index(entry["into"], f"{where}.into")
            absorbed_later = any(entry["into"] in later.get("layers", []) for later in self.merges[n + 1 :])
            if entry["into"] in seen_drop and not absorbed_later:
                raise LayerfoldError(
                    f"{where}.into: layer {entry['into']} is dropped and no later merge absorbs it; "
                    "merge into a kept layer"
                )
            if not isinstance(entry["layers"], list) or not entry["layers"]:
                raise LayerfoldError(f"{where}.layers: must be a non-empty list of layer indices")
            for i in entry["layers"]:
                self._check_index(i, f"{where}.layers")
                if i not in seen_drop:
                    raise LayerfoldError(f"{where}.layers: layer {i} is merged away, so it must be in plan.drop")
        if not isinstance(self.factors, list):
            raise LayerfoldError(f"plan.factors: must be a list, got {self.factors!r}")
        tied = {i for _, members in self.tie_groups() for i in members}
        taken: dict[tuple[int, str], int] = {}
        for n, entry in enumerate(self.factors):
            where = f"plan.factors[{n}]"
            if not isinstance(entry, dict) or set(entry) != {"layers", "projection", "rank"}:
                raise LayerfoldError(f"{where}: must be a mapping with exactly layers, projection and rank")
            layers, projection, rank = entry["layers"], entry["projection"], entry["rank"]
            if not isinstance(layers, list) or not layers:
                raise LayerfoldError(f"{where}.layers: must be a non-empty list of layer indices, got {layers!r}")
            if not isinstance(projection, str) or not projection:
                raise LayerfoldError(f"{where}.projection: must be a projection path such as self_attn.q_proj")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise LayerfoldError(f"{where}.rank: must be a positive integer, got {rank!r}")
            for i in layers:
                self._check_index(i, f"{where}.layers")
                if i in seen_drop:
                    raise LayerfoldError(f"{where}.layers: layer {i} is also in plan.drop")
                if i in tied:
                    raise LayerfoldError(f"{where}.layers: layer {i} is tied in plan.groups; factorise untied layers")
                if (i, projection) in taken:
                    raise LayerfoldError(
                        f"{where}: layer {i} {projection} is already factorised in plan.factors[{taken[i, projection]}]"
                    )
                taken[i, projection] = n

    def _check_index(self, i: Any, where: str) -> None:
        if isinstance(i, bool) or not isinstance(i, int):
            raise LayerfoldError(f"{where}: layer indices must be integers, got {i!r}")
        if not 0 <= i < self.num_layers:
            raise LayerfoldError(f"{where}: layer {i} is out of range for a {self.num_layers}-layer model")

    def validate(self, model) -> None:
        """Check the plan against a model: layer count, rank keys and ranks within each matrix's size."""
        self.check()
        family = family_of(model)
        layers = family.layer_list(model)
        if self.num_layers != len(layers):
            raise LayerfoldError(
                f"plan.num_layers: the plan is for {self.num_layers} layers but the model has {len(layers)}"
            )
        shared = family.shared_projections(self.share)
        if isinstance(self.rank, dict):
            allowed = {ATTENTION, MLP} | set(family.projections) | {p.rsplit(".", 1)[-1] for p in family.projections}
            for key in self.rank:
                if key not in allowed:
                    raise LayerfoldError(
                        f"plan.rank[{key!r}]: unknown projection for {family.model_type} "
                        f"(use one of: {', '.join(sorted(allowed))})"
                    )
        for n, entry in enumerate(self.factors):
            if entry["projection"] not in family.projections:
                raise LayerfoldError(
                    f"plan.factors[{n}].projection: {entry['projection']!r} is not a projection of "
                    f"{family.model_type} (one of: {', '.join(family.projections)})"
                )
            out_features, in_features = linear_weight(
                layers[entry["layers"][0]].get_submodule(entry["projection"])
            ).shape
            limit = min(out_features * len(entry["layers"]), in_features)
            if entry["rank"] > limit:
                raise LayerfoldError(
                    f"plan.factors[{n}].rank: {entry['rank']} is larger than {entry['projection']} of "
                    f"{len(entry['layers'])} layer(s) allows (at most {limit})"
                )
        if not self.tie_groups():
            return
        block = layers[self.tie_groups()[0][1][0]]
        for projection in shared:
            rank = self.rank_for(projection, family.kind_of(projection))
            out_features, in_features = linear_weight(block.get_submodule(projection)).shape
            if rank != "full" and rank > min(out_features, in_features):
                raise LayerfoldError(
                    f"plan.rank: rank {rank} is larger than {projection} allows "
                    f"({out_features}x{in_features}, at most {min(out_features, in_features)})"
                )

    # ---- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "FoldPlan":
        if not isinstance(data, dict):
            raise LayerfoldError(f"plan: expected a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LayerfoldError(f"plan.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        if "num_layers" not in data:
            raise LayerfoldError("plan.num_layers: missing")
        for name in ("groups", "drop", "merges", "factors"):
            if not isinstance(data.get(name, []), list):
                raise LayerfoldError(f"plan.{name}: must be a list")
        plan = cls(**data)
        plan.check()
        return plan

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "FoldPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise LayerfoldError(f"plan: not valid JSON ({err})") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> "FoldPlan":
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as err:
            raise LayerfoldError(f"plan: not valid YAML ({err})".replace("\n", " ")) from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "FoldPlan":
        path = Path(path)
        if not path.is_file():
            raise LayerfoldError(f"plan file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LayerfoldError(f"plan file is not UTF-8 text: {path}") from None
        return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)


def _check_unique(num_layers: int, unique: int, minimum: int) -> None:
    if not minimum <= unique <= num_layers:
        raise LayerfoldError(f"unique: must be between {minimum} and the number of layers ({num_layers}), got {unique}")


def _tied(groups: list[list[int]]) -> list[list[int]]:
    """Keep only groups that share; a one-layer group is just a unique layer."""
    return [g for g in groups if len(g) >= 2]
