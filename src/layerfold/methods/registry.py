"""One registry of folding methods, so that the CLI, the planner, streaming, benchmarks and tests use every
method without knowing it.

A method is one file in ``layerfold/methods/`` (listed in ``methods/__init__.py``): an options dataclass (its
docstring documents each field as ``name: help``), a ``plan(model, budget, calibration, options)`` function
that turns an original model, a parameter budget and (if it needs one) a calibration set into a FoldPlan,
and a ``register_method(Method(...))`` call. Registering it is all it takes: its options become ``layerfold fold
--method`` flags, ``variants`` lists the option sets the benchmark sweep runs, ``streams`` says whether (and
with which options) its plan follows from the shapes alone so that ``fold --stream`` can use it, and the
common tests run it on every family. ``candidates`` are the option sets the planner (``layerfold.methods.planner``)
folds and scores when it searches for a plan: the planner knows no method but through them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from torch import nn

from ..analysis.measures import Analysis, analysis_of
from ..core.budget import Budget
from ..engine.calibrate import Calibration
from ..core.errors import LayerfoldError, Registry, renamed
from ..core.families import family_of
from ..folding.in_memory import fold
from ..operations.plan import FoldPlan
from ..core.report import parameter_breakdown


@dataclass
class NoOptions:
    """This method has no options: what it removes follows from the budget."""


# What --allow must admit for the planner to try a candidate, in the order the planner tries them.
CANDIDATE_KINDS = ("drop", "tie", "drop+tie", "lora", "basis", "width", "drop+width")


@dataclass(frozen=True)
class Candidate:
    """One option set of a method that the planner folds and scores.

    ``kind``: one of CANDIDATE_KINDS (``--allow`` admits it when it admits every part of it). Whole-block
    candidates (``in_blocks``) are planned for K unique blocks, as the budget ``Budget(K / L, blocks_only)``,
    and tried again with one block fewer when per-layer tensors tip them over the budget; the others plan for
    the budget itself. A ``lora`` candidate is planned with one block fewer and the planner spends the rest of
    the budget on the rank of its ties' relaxations."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    in_blocks: bool = True


def no_candidates(analysis: Analysis) -> list[Candidate]:
    return []


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # (model, budget, calibration, options) -> plan (None: unchanged); with ``analysed``, also the analysis.
    planner: Callable[..., FoldPlan | None]
    options: type = NoOptions
    variants: Callable[[bool], list[dict[str, Any]]] = field(default=lambda quick: [{}])
    calibrated: bool = False  # needs calibration data
    analysed: bool = False  # plans from the analysis of the calibration data (``layerfold.analysis.measures``; calibrated too)
    candidates: Callable[[Analysis], list[Candidate]] = no_candidates  # what the planner tries
    # Whether a streamed fold can plan with it (from the shapes alone, on the meta device): False, True, or a
    # function of the options that returns why not (None: it can).
    streams: bool | Callable[[Any], str | None] = False
    # How it plans for a streamed fold, if not as ``planner`` with no calibration: (model, budget, options).
    stream_planner: Callable[..., FoldPlan] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def make_options(self, values: dict[str, Any]) -> Any:
        """The options dataclass from keyword values, refusing any it does not take."""
        check_options(self, values)
        return self.options(**values)

    def plan(
        self,
        model: nn.Module,
        budget: Budget,
        calibration: Calibration | None,
        analysis: Analysis | None = None,
        **options: Any,
    ) -> FoldPlan | None:
        """The plan for ``budget``. An analysed method uses ``analysis`` (the planner's), or measures one on the
        calibration data (once per calibration)."""
        if self.calibrated and calibration is None:
            raise LayerfoldError(f"method {self.name} needs calibration data (--calib PATH)")
        chosen = self.make_options(options)
        if self.analysed:
            return self.planner(model, budget, calibration, chosen, analysis or analysis_of(calibration))
        return self.planner(model, budget, calibration, chosen)

    def why_not_streamed(self, options: dict[str, Any]) -> str | None:
        """None when a streamed fold can plan with these options; else the reason."""
        if self.streams is True:
            return None
        if self.streams is False:
            return (
                f"method {self.name} measures the whole model before it plans; with --stream use one of "
                f"{', '.join(streamable())} or a --plan file"
            )
        return self.streams(self.make_options(options))

    def streamed_plan(self, model: nn.Module, budget: Budget, **options: Any) -> FoldPlan | None:
        reason = self.why_not_streamed(options)
        if reason is not None:
            raise LayerfoldError(reason)
        chosen = self.make_options(options)
        if self.stream_planner is not None:
            return self.stream_planner(model, budget, chosen)
        return self.planner(model, budget, None, chosen)


REGISTRY: Registry = Registry("method")
register_method = REGISTRY.add
get = REGISTRY.require


def streamable() -> list[str]:
    return [name for name, method in REGISTRY.items() if method.streams is not False and name != "original"]


def build(
    method: Method,
    model: nn.Module,
    budget: Budget,
    calibration: Calibration | None = None,
    *,
    sequential: bool = False,
    **options: Any,
) -> nn.Module:
    """Plan with ``method`` and fold ``model`` (in place) with the plan (``sequential``: see ``fold``)."""
    plan = method.plan(model, budget, calibration, **options)
    if plan is None:
        return model
    statistics = calibration.statistics() if plan.whitens() else None
    return fold(model, plan, calibration=statistics, progress=False, sequential=sequential)


def check_options(method: Method, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(method.option_names))
    if unknown:
        accepted = ", ".join("--" + o.replace("_", "-") for o in method.option_names) or "no options"
        raise LayerfoldError(
            f"method {method.name} does not take --{unknown[0].replace('_', '-')} (it takes: {accepted})"
        )


# ---- what the CLI needs to know about options --------------------------------------------------------------
def option_help(options: type) -> dict[str, str]:
    """Each field's help, from the options dataclass's docstring: lines ``name: help`` (continued by indented
    lines); a field an options class inherits is documented by the class it comes from."""
    names = {f.name for f in dataclasses.fields(options)}
    helps: dict[str, str] = {}
    for cls in reversed(options.__mro__):  # the subclass's own words last, so they win
        current = None
        for line in (cls.__dict__.get("__doc__") or "").splitlines():
            match = re.match(r"\s*-?\s*(?:``)?(\w+)(?:``)?\s*:\s*(.*)", line)
            if match and match.group(1) in names:
                current = match.group(1)
                helps[current] = match.group(2).strip()
            elif current and line.strip():
                helps[current] += " " + line.strip()
            else:
                current = None
    for f in dataclasses.fields(options):  # a field declared with ``core.settings.setting`` says its own help
        if f.name not in helps and "cli" in f.metadata:
            helps[f.name] = f.metadata["cli"]["help"]
    for f in dataclasses.fields(options):  # a field drawn from a registry lists what is registered now
        if "choices" in f.metadata and f.name in helps:
            helps[f.name] = helps[f.name].rstrip(".") + f" (one of: {', '.join(f.metadata['choices'])})."
    return helps


def option_types(options: type) -> dict[str, Any]:
    return typing.get_type_hints(options)


def all_options() -> dict[str, dict[str, Any]]:
    """Every option any registered method takes: its type, the methods that take it and their help (``helps``:
    help -> the methods that give it, as methods may mean different values by one name, e.g. --score)."""
    found: dict[str, dict[str, Any]] = {}
    for method in REGISTRY.values():
        helps, types = option_help(method.options), option_types(method.options)
        for name in method.option_names:
            entry = found.setdefault(name, {"type": types[name], "methods": [], "helps": {}})
            entry["methods"].append(method.name)
            entry["helps"].setdefault(helps.get(name, ""), []).append(method.name)
    return found


def option_flags() -> dict[str, tuple[Any, str, Callable[[Any], Any]]]:
    """Every option as a command-line flag: (the annotation the CLI parses it as, its help naming the methods
    that take it, the parser of its text: a list's items comma-separated and typed)."""
    from ..core.settings import parse_list, present_type

    flags = {}
    for name, info in all_options().items():
        kind = present_type(info["type"])
        text = " ".join(f"{', '.join(names)}: {help}" for help, names in info["helps"].items())
        if typing.get_origin(kind) in (list, tuple):
            flags[name] = (Optional[str], text, parse_list(typing.get_args(kind)[0], "--" + name.replace("_", "-")))
        else:
            flags[name] = (Optional[kind], text, lambda value: value)
    return flags


# ---- helpers the methods share ----------------------------------------------------------------------------
def num_layers(model: nn.Module) -> int:
    return len(family_of(model).layer_list(model))


def unique_blocks_for(model: nn.Module, budget: Budget) -> int:
    """The number of whole blocks that spends the budget (rounded), for methods that count in blocks."""
    blocks = parameter_breakdown(model)["blocks"]
    fraction = budget.keep if budget.blocks_only else 1 - budget.reduction(model) / blocks
    if fraction <= 0:
        raise budget.unreachable(model, blocks, "whole-block methods")
    return min(num_layers(model), max(1, round(fraction * num_layers(model))))


def evenly_spaced(num: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``num`` layers, first and last included."""
    return sorted({int(i) for i in np.linspace(0, num - 1, keep).round()}) if keep > 1 else [0]


def lowest(scores: list[float], count: int) -> list[int]:
    """The indices of the ``count`` lowest scores, in order (ties: the earlier index first)."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:count])


def drop_plan(model: nn.Module, kept: list[int]) -> FoldPlan:
    layers = num_layers(model)
    return FoldPlan.from_groups([], drop=sorted(set(range(layers)) - set(kept)), num_layers=layers)


register = renamed(register_method, "layerfold.methods.registry.register", "register_method")  # the old name, kept working


def method_plan(method: str, budget, options: dict | None = None) -> Callable[[nn.Module], FoldPlan]:
    """The plan a registered method makes at ``budget``, as a function of the original on the meta device; a
    method that must measure the whole model first is refused here, before any work."""
    chosen = get(method)
    options = dict(options or {})
    reason = chosen.why_not_streamed(options)
    if reason is not None:
        raise LayerfoldError(reason)
    return lambda model: chosen.streamed_plan(model, budget, **options)
