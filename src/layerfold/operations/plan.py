"""FoldPlan: an ordered list of typed operations (``layerfold.operations``) over an L-layer model.

A plan is plain data that round-trips through JSON and YAML::

    num_layers: 4
    operations:
    - {op: tie, layers: [0, 2], share: all, sources: [0, 2], rank: 2, share_bias: false}
    - {op: factor, layers: [1, 3], projection: self_attn.q_proj, rank: 8, whiten: true}
    - {op: drop, layers: [3]}
    provenance: {method: ...}

Layer indices always refer to the original model's layers. Operations apply in order; drops take effect last.
Each operation that holds shared tensors does so in the fold's store under its key, ``<kind>_<n>`` (the n-th
operation of its kind). Plan files of layerfold 0.1 (one field per kind of step: ``groups``, ``drop``,
``factors``, ...) are converted on reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import LayerfoldError
from ..core.families import family_of
from . import OPERATIONS, Drop, Factor, Merge, Operation, PruneHeads, Rank, Tie
from .geometry import Prune
from .tie.forms import FORM_OPTION_NAMES
from .tie.spec import GROUP_FIT_CHOICES, init_sources, tie_fit

FIT_CHOICES = GROUP_FIT_CHOICES  # the plan-level name
_LEGACY_FIELDS = ("groups", "drop", "share", "init", "rank", "share_bias", "merges", "factors", "whiten")


@dataclass
class FoldPlan:
    """How to fold an L-layer model: ``operations`` in order, and ``provenance``, a free-form record of how the
    plan was made (method, budget, calibration) that is not used to rebuild the model."""

    num_layers: int
    operations: list[Operation] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def identity(cls, num_layers: int) -> "FoldPlan":
        return cls(num_layers=num_layers)

    @classmethod
    def cycle(cls, num_layers: int, unique: int, **options: Any) -> "FoldPlan":
        """Layer i uses unique block i mod K (the model loops K blocks)."""
        _check_unique(num_layers, unique, minimum=1)
        return cls.from_groups([list(range(k, num_layers, unique)) for k in range(unique)], num_layers=num_layers, **options)

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
        return cls.from_groups(groups, num_layers=num_layers, **options)

    @classmethod
    def middle_cycle(cls, num_layers: int, unique: int, **options: Any) -> "FoldPlan":
        """First and last layers stay unique; the middle layers cycle over the remaining K-2 blocks."""
        _check_unique(num_layers, unique, minimum=3)
        groups = [list(range(1 + k, num_layers - 1, unique - 2)) for k in range(unique - 2)]
        return cls.from_groups(groups, num_layers=num_layers, **options)

    @classmethod
    def from_groups(
        cls,
        groups: list[list[int]],
        drop: list[int] | tuple[int, ...] = (),
        *,
        num_layers: int | None = None,
        share: str = "all",
        fit: str = "average",
        rank: Rank | dict[str, Rank] = 0,
        share_bias: bool = False,
        whiten: bool = False,
        provenance: dict[str, Any] | None = None,
        init: str | None = None,
        relax: str | dict[str, str] = "lora",
        seed: int = 0,
        **form_options: int,
    ) -> "FoldPlan":
        """Tie each group of two or more layers (a one-layer group is just a unique layer) and drop ``drop``.
        ``fit``: the shared weights are the ``average`` of a group's layers, one layer each (``lower`` or
        ``stepwise``, see ``operations.tie.spec.init_sources``), or their least-squares fit on calibration
        data (``lstsq``). ``whiten``: relaxations truncated in the space whitened by each layer's inputs
        (calibration data). ``relax``, ``seed`` and by name the forms' options (``private``, ``mos_pool``,
        ``kron_factor``, ...: ``operations.tie.forms.FormOptions``): the relaxations' form (``Tie``). ``init`` is
        fit's earlier name."""
        fit = init if init is not None else fit
        groups = [sorted(int(i) for i in g) for g in groups]
        drop = sorted(int(i) for i in drop)
        if num_layers is None:
            indices = [i for g in groups for i in g] + drop
            if not indices:
                raise LayerfoldError("plan: from_groups needs num_layers when no groups or drops are given")
            num_layers = max(indices) + 1
        _check_fit(fit)
        tied = [g for g in groups if len(g) >= 2]
        operations: list[Operation] = [
            Tie(layers=g, share=share, sources=s, rank=rank, share_bias=share_bias, whiten=whiten, relax=relax,
                seed=seed, form_options=dict(form_options), **tie_fit(fit))  # fmt: skip
            for g, s in zip(tied, init_sources(tied, fit))
        ]
        if drop:
            operations.append(Drop(layers=drop))
        return cls(num_layers=num_layers, operations=operations, provenance=dict(provenance or {}))

    def set_tie_options(self, *, fit: str | None = None, init: str | None = None, **options: Any) -> None:
        """Set ``rank``, ``share``, ``share_bias`` or ``whiten`` of every tie, and with ``fit`` (or its earlier
        name ``init``) how their shared weights are fitted."""
        fit = init if init is not None else fit
        for op in self.ties():
            for name, value in options.items():
                if name in FORM_OPTION_NAMES:
                    op.form_options = {**op.form_options, name: value}
                else:
                    setattr(op, name, value)
        if fit is not None:
            _check_fit(fit)
            for op, sources in zip(self.ties(), init_sources([op.layers for op in self.ties()], fit)):
                op.sources = sources
                for name, value in tie_fit(fit).items():
                    setattr(op, name, value)

    # ---- derived views ------------------------------------------------------------------------------
    def of_kind(self, kind: type[Operation]) -> list[Operation]:
        return [op for op in self.operations if isinstance(op, kind)]

    def ties(self) -> list[Tie]:
        return self.of_kind(Tie)

    def factors(self) -> list[Factor]:
        return self.of_kind(Factor)

    def merges(self) -> list[Merge]:
        return self.of_kind(Merge)

    def prunes(self) -> list[Prune]:
        return [op for op in self.operations if isinstance(op, Prune)]

    def keeps_base_architecture(self) -> bool:
        """Whether every operation keeps the base architecture (drops, merges, width pruning): the fold is the
        base architecture with fewer layers or narrower projections (exports as such)."""
        return all(op.keeps_architecture for op in self.operations)

    def dropped(self) -> list[int]:
        return sorted(i for op in self.of_kind(Drop) for i in op.layers)

    def kept_layers(self) -> list[int]:
        dropped = set(self.dropped())
        return [i for i in range(self.num_layers) if i not in dropped]

    def keyed(self) -> list[tuple[str, Operation]]:
        """Each operation with its key, ``<kind>_<n>``: the name its shared tensors have in the store."""
        counts: dict[str, int] = {}
        keyed = []
        for op in self.operations:
            n = counts.get(op.kind, 0)
            counts[op.kind] = n + 1
            keyed.append((f"{op.kind}_{n}", op))
        return keyed

    def operation(self, key: str) -> Operation:
        for name, op in self.keyed():
            if name == key:
                return op
        raise LayerfoldError(f"plan: no operation {key}")

    def whitens(self) -> bool:
        """Whether folding needs calibration statistics (an operation fits to calibration data)."""
        return any(op.needs_calibration() for op in self.operations)

    def calibrated_steps(self) -> str:
        """What in the plan fits to calibration data, for messages."""
        steps = [step for op in self.operations for step in op.calibration_steps()]
        return " and ".join(dict.fromkeys(steps)) or "this plan"

    def unique_blocks(self) -> int:
        """How many distinct sets of shared projections the folded model has."""
        grouped = {i for op in self.ties() for i in op.layers}
        return len(self.ties()) + sum(1 for i in self.kept_layers() if i not in grouped)

    def describe(self) -> str:
        """One line: the layers kept and unique, then what each kind of operation does (each says, in the
        registry's order), then the method."""
        parts = [f"{self.num_layers} layers -> {len(self.kept_layers())} kept, {self.unique_blocks()} unique blocks"]
        for kind in OPERATIONS.values():
            of_kind = [op for op in self.operations if type(op) is kind]
            if of_kind:
                parts.extend(kind.describe(of_kind))
        if self.provenance.get("method"):
            parts.append(f"method={self.provenance['method']}")
        return "; ".join(parts)

    # ---- checks ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Reject plans that are impossible for any model; the message names the offending operation."""
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise LayerfoldError(f"plan.num_layers: must be a positive integer, got {self.num_layers!r}")
        if not isinstance(self.provenance, dict):
            raise LayerfoldError(f"plan.provenance: must be a mapping, got {self.provenance!r}")
        if not isinstance(self.operations, list):
            raise LayerfoldError(f"plan.operations: must be a list, got {self.operations!r}")
        for n, op in enumerate(self.operations):
            if not isinstance(op, Operation):
                raise LayerfoldError(f"plan.operations[{n}]: not an operation: {op!r}")
            op.check(self.num_layers, _where(n, op))
        dropped: dict[int, int] = {}
        for n, op in enumerate(self.operations):
            for i in op.layers if isinstance(op, Drop) else ():
                if i in dropped:
                    raise LayerfoldError(f"{_where(n, op)}.layers: layer {i} is already dropped by {_where(dropped[i])}")
                dropped[i] = n
        if len(dropped) == self.num_layers:
            raise LayerfoldError(f"plan: drops all {self.num_layers} layers; at least one must stay")
        tied: dict[int, int] = {}
        for n, op in enumerate(self.operations):
            for i in op.layers if isinstance(op, Tie) else ():
                if i in dropped:
                    raise LayerfoldError(f"{_where(n, op)}.layers: layer {i} is also dropped by {_where(dropped[i])}")
                if i in tied:
                    raise LayerfoldError(f"{_where(n, op)}.layers: layer {i} is already tied by {_where(tied[i])}")
                tied[i] = n
        factored: dict[tuple[int, str], int] = {}
        reads_weights = None  # the first operation that reads weights a merge may still change
        for n, op in enumerate(self.operations):
            where = _where(n, op)
            if isinstance(op, (Tie, Factor)) and reads_weights is None:
                reads_weights = n
            if isinstance(op, Merge):
                if reads_weights is not None:
                    raise LayerfoldError(f"{where}: merges must come before {_where(reads_weights)}")
                later = self.operations[n + 1 :]
                absorbed_later = any(isinstance(m, Merge) and op.into in m.layers for m in later)
                if op.into in dropped and not absorbed_later:
                    raise LayerfoldError(
                        f"{where}.into: layer {op.into} is dropped and no later merge absorbs it; merge into a kept layer"
                    )
                for i in op.layers:
                    if i not in dropped:
                        raise LayerfoldError(f"{where}.layers: layer {i} is merged away, so a drop must remove it")
            elif isinstance(op, Factor):
                for i in op.layers:
                    if i in dropped:
                        raise LayerfoldError(f"{where}.layers: layer {i} is also dropped by {_where(dropped[i])}")
                    if i in tied:
                        raise LayerfoldError(
                            f"{where}.layers: layer {i} is tied by {_where(tied[i])}; factorise untied layers"
                        )
                    if (i, op.projection) in factored:
                        raise LayerfoldError(
                            f"{where}: layer {i} {op.projection} is already factorised by "
                            f"{_where(factored[i, op.projection])}"
                        )
                    factored[i, op.projection] = n
        self._check_prunes(dropped, tied, factored)

    def _check_prunes(self, dropped: dict, tied: dict, factored: dict) -> None:
        """A pruned layer keeps its own, smaller projections: it is not dropped, pruned twice the same way or
        tied in the part it prunes (what a tie shares has one shape); ``validate`` refuses factorising it."""
        pruned: dict[tuple[int, str], int] = {}
        for n, op in enumerate(self.operations):
            if not isinstance(op, Prune):
                continue
            where = _where(n, op)
            for i in op.layers:
                if i in dropped:
                    raise LayerfoldError(f"{where}.layers: layer {i} is also dropped by {_where(dropped[i])}")
                if (i, op.kind) in pruned:
                    raise LayerfoldError(f"{where}.layers: layer {i} is already pruned by {_where(pruned[i, op.kind])}")
                pruned[i, op.kind] = n
                part = "attention" if isinstance(op, PruneHeads) else "mlp"
                if i in tied and self.operations[tied[i]].share in ("all", part):
                    raise LayerfoldError(
                        f"{where}.layers: layer {i}'s {part} is tied by {_where(tied[i])}; prune untied layers, or tie "
                        f"only the other part (share={'mlp' if part == 'attention' else 'attention'})"
                    )

    def validate(self, model) -> None:
        """Check the plan against a model: layer count, projections and ranks within each matrix's size."""
        self.check()
        family = family_of(model)
        layers = family.layer_list(model)
        if self.num_layers != len(layers):
            raise LayerfoldError(
                f"plan.num_layers: the plan is for {self.num_layers} layers but the model has {len(layers)}"
            )
        for n, op in enumerate(self.operations):
            op.validate(family, layers, _where(n, op))
        factored = {(i, op.projection): n for n, op in enumerate(self.operations) if isinstance(op, Factor)
                    for i in op.layers}  # fmt: skip
        for n, op in enumerate(self.operations):
            paths = family.attention if isinstance(op, PruneHeads) else family.mlp if isinstance(op, Prune) else ()
            for i, path in ((i, p) for i in getattr(op, "layers", ()) for p in paths):
                if (i, path) in factored:
                    raise LayerfoldError(
                        f"{_where(n, op)}.layers: layer {i} {path} is also factorised by {_where(factored[i, path])}; "
                        "a layer's pruned part cannot be factorised too"
                    )

    # ---- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "operations": [op.to_dict() for op in self.operations],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "FoldPlan":
        if not isinstance(data, dict):
            raise LayerfoldError(f"plan: expected a mapping of fields, got {type(data).__name__}")
        if "operations" not in data and set(data) & set(_LEGACY_FIELDS):
            data = convert_legacy(data)
        known = ("num_layers", "operations", "provenance")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise LayerfoldError(f"plan.{unknown[0]}: unknown field (known: {', '.join(known)})")
        if "num_layers" not in data:
            raise LayerfoldError("plan.num_layers: missing")
        entries = data.get("operations", [])
        if not isinstance(entries, list):
            raise LayerfoldError("plan.operations: must be a list")
        operations = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or "op" not in entry:
                raise LayerfoldError(f"plan.operations[{n}]: must be a mapping with an op field, got {entry!r}")
            kind = OPERATIONS.get(entry["op"]) if isinstance(entry["op"], str) else None
            if kind is None:
                raise LayerfoldError(
                    f"plan.operations[{n}].op: unknown operation {entry['op']!r} (known: {', '.join(OPERATIONS)})"
                )
            operations.append(kind.from_dict(entry, f"plan.operations[{n}]"))
        plan = cls(num_layers=data["num_layers"], operations=operations, provenance=data.get("provenance", {}))
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


def _where(n: int, op: Operation | None = None) -> str:
    return f"plan.operations[{n}]" + (f" ({op.kind})" if op is not None else "")


def _check_fit(fit: Any) -> None:
    if fit not in FIT_CHOICES:
        raise LayerfoldError(f"plan.fit: must be one of {', '.join(FIT_CHOICES)}, got {fit!r}")


def _check_unique(num_layers: int, unique: int, minimum: int) -> None:
    if not minimum <= unique <= num_layers:
        raise LayerfoldError(f"unique: must be between {minimum} and the number of layers ({num_layers}), got {unique}")


# ---- layerfold 0.1's plan schema ---------------------------------------------------------------------------
def _legacy_ties(groups: list) -> list[int]:
    """The positions in a 0.1 plan's ``groups`` of the groups that tie (two or more layers): the n-th is
    ``tie_n`` once converted."""
    return [g for g, members in enumerate(groups) if isinstance(members, list) and len(members) >= 2]


def legacy_store_keys(data: dict) -> dict[int, str]:
    """Format 1 named the store's entries by position: entry g < len(groups) held ``groups[g]``'s shared
    projections, entry len(groups) + f the basis of ``factors[f]``. Each position's key in the converted plan."""
    groups = data.get("groups", []) if isinstance(data.get("groups"), list) else []
    factors = data.get("factors", []) if isinstance(data.get("factors"), list) else []
    keys = {g: f"tie_{n}" for n, g in enumerate(_legacy_ties(groups))}
    keys.update({len(groups) + f: f"factor_{f}" for f in range(len(factors))})
    return keys


def convert_legacy(data: dict) -> dict:
    """A plan mapping in layerfold 0.1's schema as an ordered list of operations: merges (in order), ties,
    factorisations, then one drop."""
    unknown = sorted(set(data) - set(_LEGACY_FIELDS) - {"num_layers", "provenance"})
    if unknown:
        raise LayerfoldError(f"plan.{unknown[0]}: unknown field (known: num_layers, operations, provenance)")
    for name in ("groups", "drop", "merges", "factors"):
        if not isinstance(data.get(name, []), list):
            raise LayerfoldError(f"plan.{name}: must be a list")
    init = data.get("init", "average")
    if init not in FIT_CHOICES[:3]:  # layerfold 0.1 knew these three
        raise LayerfoldError(f"plan.init: must be one of {', '.join(FIT_CHOICES[:3])}, got {init!r}")
    for g, members in enumerate(data.get("groups", [])):
        if not isinstance(members, list) or not members or not all(isinstance(i, int) for i in members):
            raise LayerfoldError(f"plan.groups[{g}]: must be a non-empty list of layer indices, got {members!r}")
    operations: list[dict] = []
    for n, entry in enumerate(data.get("merges", [])):
        if not isinstance(entry, dict) or set(entry) != {"into", "layers"}:
            raise LayerfoldError(f"plan.merges[{n}]: must be a mapping with exactly into and layers")
        operations.append({"op": "merge", **entry})
    groups = data.get("groups", [])
    tied = [sorted(groups[g]) for g in _legacy_ties(groups)]
    for members, sources in zip(tied, init_sources(tied, init)):
        operations.append(
            {
                "op": "tie",
                "layers": members,
                "share": data.get("share", "all"),
                "sources": sources,
                "rank": data.get("rank", 0),
                "share_bias": data.get("share_bias", False),
            }
        )
    for n, entry in enumerate(data.get("factors", [])):
        if not isinstance(entry, dict) or set(entry) != {"layers", "projection", "rank"}:
            raise LayerfoldError(f"plan.factors[{n}]: must be a mapping with exactly layers, projection and rank")
        operations.append({"op": "factor", **entry, "whiten": data.get("whiten", True)})
    if data.get("drop"):
        operations.append({"op": "drop", "layers": list(data["drop"])})
    converted = {"num_layers": data.get("num_layers"), "operations": operations, "provenance": data.get("provenance", {})}
    return {k: v for k, v in converted.items() if v is not None}
