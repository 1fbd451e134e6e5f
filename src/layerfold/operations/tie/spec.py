"""The ``tie`` operation: Relaxed Recursive Transformers' layer tying with a per-layer LoRA relaxation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import LayerfoldError
from ...core.families import ATTENTION, MLP, linear_weight
from ..base import Operation, Rank, check_bool, check_layer_list, check_rank, sorted_layers
from .forms import FORM_CHOICES, FORM_OPTION_NAMES, check_form_options, form_of

SHARE_CHOICES = ("all", ATTENTION, MLP)
FIT_CHOICES = ("mean", "lstsq")
# How a plan fits its tie groups' shared weights: the mean of each group's layers, one layer each (Relaxed
# Recursive Transformers' Lower and Stepwise), or least squares on their calibration inputs.
GROUP_FIT_CHOICES = ("average", "stepwise", "lower", "lstsq")
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
    (``attention``/``mlp``), name (``q_proj``) or path (``self_attn.q_proj``) to a rank.
    ``relax``: the relaxation's form, for all projections or as such a mapping: ``lora`` (private factors) or a
    registered form (``forms.FORMS``: VeRA, SVFit, MoS, Kronecker); ``form_options`` the forms' options by name
    (``private``, ``mos_pool``, ``mos_shard``, ``kron_factor``, ``kron_terms``: each form's ``Options``), written
    in the plan beside the tie's other fields; see ``forms``."""

    kind = "tie"

    layers: list[int]
    share: str = "all"
    sources: list[int] = field(default_factory=list)
    rank: Rank | dict[str, Rank] = 0
    share_bias: bool = False
    fit: str = "mean"
    whiten: bool = False
    relax: str | dict[str, str] = "lora"
    seed: int = 0
    form_options: dict[str, int] = field(default_factory=dict)  # the forms' options by name (``forms.FormOptions``)

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
        forms = self.relax.items() if isinstance(self.relax, dict) else [(None, self.relax)]
        for key, value in forms:
            if value not in FORM_CHOICES:
                name = f"{where}.relax" if key is None else f"{where}.relax[{key!r}]"
                raise LayerfoldError(f"{name}: must be one of {', '.join(FORM_CHOICES)}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise LayerfoldError(f"{where}.seed: must be a non-negative integer, got {self.seed!r}")
        check_form_options(self.form_options, where)

    keeps_architecture = False

    def calibration_steps(self) -> list[str]:
        return (["least-squares ties"] if self.fit == "lstsq" else []) + (["whitened tie relaxations"] if self.whiten else [])

    @classmethod
    def describe(cls, operations: list["Tie"]) -> list[str]:
        ties, parts = operations, []
        if len({t.share for t in ties}) == 1 and len({json.dumps(t.rank, sort_keys=True) for t in ties}) == 1:
            whitened = ", whitened relaxations" if all(t.whiten for t in ties) and ties[0].rank != 0 else ""
            parts.append(f"share={ties[0].share}, fit={group_fit_name(ties)}, rank={ties[0].rank}{whitened}")
        else:
            parts.append(f"{len(ties)} tie groups")
        forms = {json.dumps(t.relax, sort_keys=True) for t in ties} - {'"lora"'}
        if forms:
            used = sorted({name for t in ties for name in t.form_names()} - {"lora"})
            details = sorted({form_of(t, name).describe() for t in ties for name in t.form_names() if name in used})
            parts.append("relax=" + "; ".join(sorted(f.strip('"') for f in forms)) + "".join(details))
        if any("vera" in json.dumps(t.relax) for t in ties):
            seeds = sorted({t.seed for t in ties})
            parts.append(f"VeRA bases made from seed {', '.join(map(str, seeds))} on load, not stored")
        return parts

    def rank_for(self, projection: str, kind: str) -> Rank:
        """The relaxation rank of one projection (path relative to a block, e.g. ``self_attn.q_proj``)."""
        return _per_projection(self.rank, projection, kind, 0)

    def relax_for(self, projection: str, kind: str) -> str:
        """The relaxation form of one projection: ``lora`` or a name of ``forms.FORMS``."""
        return _per_projection(self.relax, projection, kind, "lora")

    def form_names(self) -> set[str]:
        return set(self.relax.values()) | {"lora"} if isinstance(self.relax, dict) else {self.relax}

    def form_rank(self, projection: str, kind: str, shape: tuple[int, int]) -> int:
        """A form relaxation's rank as an int (``full``: the largest its form can use)."""
        rank = self.rank_for(projection, kind)
        return int(rank) if rank != "full" else form_of(self, self.relax_for(projection, kind)).full_rank(shape)

    def validate(self, family, layers, where: str) -> None:
        allowed = {ATTENTION, MLP} | set(family.projections) | {p.rsplit(".", 1)[-1] for p in family.projections}
        for field_name in ("rank", "relax"):
            for key in getattr(self, field_name) if isinstance(getattr(self, field_name), dict) else ():
                if key not in allowed:
                    raise LayerfoldError(
                        f"{where}.{field_name}[{key!r}]: unknown projection for {family.model_type} "
                        f"(use one of: {', '.join(sorted(allowed))})"
                    )
        block = layers[self.layers[0]]
        for projection in family.shared_projections(self.share):
            kind = family.kind_of(projection)
            rank = self.rank_for(projection, kind)
            out_features, in_features = linear_weight(block.get_submodule(projection)).shape
            form = self.relax_for(projection, kind)
            if form != "lora":
                shape = (out_features, in_features)
                form_of(self, form).check(self.form_rank(projection, kind, shape), shape,
                                          f"{where}.rank ({projection}, {form})")  # fmt: skip
            elif rank != "full" and rank > min(out_features, in_features):
                raise LayerfoldError(
                    f"{where}.rank: rank {rank} is larger than {projection} allows "
                    f"({out_features}x{in_features}, at most {min(out_features, in_features)})"
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["rank"] = dict(self.rank) if isinstance(self.rank, dict) else self.rank
        data["relax"] = dict(self.relax) if isinstance(self.relax, dict) else self.relax
        for name, default in (("relax", "lora"), ("seed", 0)):
            if data[name] == default:
                del data[name]  # plans of private-LoRA ties read as before forms existed
        # The forms' options sit in the tie's entry by name, as the plan file has always written them.
        data.update({k: v for k, v in data.pop("form_options").items() if v})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Tie":
        own = {k: v for k, v in data.items() if k not in FORM_OPTION_NAMES}
        form_options = {k: v for k, v in data.items() if k in FORM_OPTION_NAMES}
        return super().from_dict({**own, "form_options": {**own.get("form_options", {}), **form_options}}, where)

    @classmethod
    def example(cls, model) -> list[Operation]:
        return [cls(layers=[0, 2], rank=2, fit="lstsq", whiten=True)]


def _per_projection(value: Any, projection: str, kind: str, default: Any) -> Any:
    """A tie setting for one projection: the value itself, or from a mapping by path, name or kind."""
    if not isinstance(value, dict):
        return value
    leaf = projection.rsplit(".", 1)[-1]
    for key in (projection, leaf, kind):
        if key in value:
            return value[key]
    return default


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


def tie_fit(fit: str) -> dict[str, Any]:
    """The Tie fields a plan's ``fit`` choice (``GROUP_FIT_CHOICES``) sets, besides the sources."""
    return {"fit": "lstsq" if fit == "lstsq" else "mean"}


def group_fit_name(ties: list[Tie]) -> str:
    """The plan-level fit choice these ties were made with, or "given sources"."""
    groups, sources = [t.layers for t in ties], [t.sources for t in ties]
    for fit in GROUP_FIT_CHOICES:
        if init_sources(groups, fit) == sources and all({"fit": t.fit} == tie_fit(fit) for t in ties):
            return fit
    return "given sources"
