"""One fold engine for both paths: in memory (``layerfold.fold``) and streamed from a checkpoint
(``layerfold.folding.streamed``).

A plan's operations first build the folded model's structure (``apply_structure``: new modules with empty
tensors, as ``load`` needs too). Then every tensor the folded model stores gets a recipe: copied from an
original tensor, or computed by the operation that owns it (``operations/<kind>/build.py``: a tie's shared
weight and relaxations, a factorisation's basis and coefficients). Recipes that read the same original
tensors form a unit, units run in the order of the last original layer they read, and each computes from
original tensors read through ``Originals``, which applies the plan's LaCo merges on the way. The two paths
differ only in where the original tensors come from (the model in memory, or the checkpoint's shards) and
where the results go (the model's parameters, or a shard writer); no operation has code for either path.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import LayerfoldError
from ..core.families import Family, family_of
from ..operations import Operation, Recipe
from ..operations.drop.build import drop_layers
from ..operations.merge.build import merged_inputs, merged_value
from ..operations.plan import FoldPlan
from ..core.store import STATE_ATTRIBUTE, FoldState

Input = tuple  # (original layer index, name inside the block) or (None, full tensor name)


@dataclass
class Context:
    """What a unit may need besides its inputs: the Gram matrix of a projection's inputs on calibration text
    (``gram(layer, projection)``), and a cache shared by every fold of one original (decompositions; None: do
    not keep them, as a streamed fold must not)."""

    gram: Callable[[int, str], torch.Tensor] | None = None
    cache: dict | None = None


def implementation(op: Operation) -> ModuleType:
    """Where an operation's build functions are (how it builds, what it stores, how it computes): the ``build``
    module beside its ``spec`` in an operation's folder, or the spec's own module for a one-file operation."""
    package, _, leaf = type(op).__module__.rpartition(".")
    return importlib.import_module(package + ".build" if leaf == "spec" else type(op).__module__)


# ---- structure ------------------------------------------------------------------------------------------
def apply_structure(model: nn.Module, plan: FoldPlan, *, base_config: dict, base_architecture: str) -> FoldState:
    """Build a folded model's modules in place, their new tensors empty (on the meta device for a model built
    there): ``fold`` then fills them, ``load`` reads a checkpoint into them."""
    family = family_of(model)
    state = FoldState(plan, base_config, base_architecture)
    for key, op in plan.keyed():
        build = getattr(implementation(op), "build", None)
        if build is not None:
            build(model, family, key, op, state)
    drop_layers(model, family, plan.kept_layers(), plan.num_layers)
    model.base_model.add_module(STATE_ATTRIBUTE, state)
    return state


def sync_plan(model: nn.Module) -> None:
    """Bring a folded model's plan in line with its modules before it is saved (an operation's optional
    ``sync``: e.g. tie relaxations grown by a merged PEFT LoRA)."""
    state = getattr(model.base_model, STATE_ATTRIBUTE, None)
    if state is None:
        return
    family = family_of(model)
    for key, op in state.plan.keyed():
        sync = getattr(implementation(op), "sync", None)
        if sync is not None:
            sync(model, family, key, op, state.plan.kept_layers())


def layer_prefixes(model: nn.Module, family: Family) -> dict[int, str]:
    """Each original layer's tensor name prefix (``model.layers.3.``), read before the structure changes."""
    names = {id(module): name for name, module in model.named_modules()}
    return {i: names[id(block)] + "." for i, block in enumerate(family.layer_list(model))}


# ---- recipes and units ----------------------------------------------------------------------------------
def recipes_for(folded: nn.Module, plan: FoldPlan, layer_prefix: dict[int, str]) -> tuple[list[Recipe], dict[str, str]]:
    """A recipe for every tensor the folded model stores, and its aliases (other names of a stored tensor, as
    ``io._unique_state`` finds them)."""
    family = family_of(folded)
    kept = plan.kept_layers()
    operations = dict(plan.keyed())
    module_of: dict[int, tuple[nn.Module, str]] = {}
    for module in folded.modules():
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and id(tensor) not in module_of:
                module_of[id(tensor)] = (module, attr)
    block_of: dict[int, tuple[int, str]] = {}  # module -> (original layer, path inside the block)
    for position, block in enumerate(family.layer_list(folded)):
        for path, module in block.named_modules():
            block_of.setdefault(id(module), (kept[position], path))
    store_of: dict[int, tuple[str, str]] = {}  # module -> (operation key, path inside its store entry)
    for key, entry in getattr(folded.base_model, STATE_ATTRIBUTE).items():
        for path, module in entry.named_modules():
            store_of[id(module)] = (key, path)

    recipes: list[Recipe] = []
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in folded.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        module, attr = module_of[id(tensor)]
        recipe = None
        if attr in module._buffers and tensor.device.type != "meta":
            # A persistent buffer the model computes itself (built with real buffers): stored as computed.
            recipe = Recipe(name, "value", [], detail={"value": tensor.detach()})
        elif id(module) in store_of:
            key, path = store_of[id(module)]
            recipe = implementation(operations[key]).store_recipe(
                name, key, operations[key], path, attr, module
            )
        elif id(module) in block_of:
            i, path = block_of[id(module)]
            key = getattr(module, "op_key", None)
            if key is not None:
                recipe = implementation(operations[key]).layer_recipe(name, key, operations[key], i, path, attr, module)
            if recipe is None:
                recipe = Recipe(name, "copy", [(i, f"{path}.{attr}" if path else attr)])
        else:
            recipe = Recipe(name, "copy", [(None, name)])
        recipe.shape, recipe.dtype = tuple(tensor.shape), tensor.dtype
        recipes.append(recipe)
    return recipes, aliases


def units_of(recipes: list[Recipe], num_layers: int) -> list[list[Recipe]]:
    """Recipes that compute together (an operation's unit, or one copied tensor), ordered by the last original
    layer they read."""
    grouped: dict[tuple, list[Recipe]] = defaultdict(list)
    for recipe in recipes:
        grouped[(recipe.op, *recipe.unit) if recipe.op is not None else ("copy", recipe.name)].append(recipe)
    return sorted(grouped.values(), key=lambda unit: last_layer(unit, num_layers))


def last_layer(unit: list[Recipe], num_layers: int) -> int:
    """The last original layer a unit reads (``num_layers`` for embeddings and heads: they come last)."""
    return max((i for r in unit for i, _ in r.inputs if i is not None), default=num_layers)


def gram_needs(plan: FoldPlan, family: Family) -> dict[int, set[str]]:
    """For each original layer, the projections whose input Gram matrices the plan's operations need."""
    needs: dict[int, set[str]] = defaultdict(set)
    for op in plan.operations:
        for layer, projection in getattr(implementation(op), "gram_needs", lambda op, family: ())(op, family):
            needs[layer].add(projection)
    return needs


# ---- original tensors -----------------------------------------------------------------------------------
class Originals:
    """Original tensors by input key, read with ``read_names`` (full names -> tensors), with the plan's LaCo
    merges applied in order (``merged=False``: as stored). A key's full name is its layer's prefix and its name
    in the block, passed through ``resolve`` (a checkpoint's own spelling of the model's names)."""

    def __init__(
        self,
        read_names: Callable,
        layer_prefix: dict[int, str],
        plan: FoldPlan,
        resolve: Callable[[str], str] = lambda name: name,
    ) -> None:
        self.read_names, self.layer_prefix, self.merges, self.resolve = read_names, layer_prefix, plan.merges(), resolve

    def name_of(self, key: Input) -> str:
        layer, name = key
        return self.resolve(name if layer is None else self.layer_prefix[layer] + name)

    def read(self, keys: list[Input], *, merged: bool = True) -> dict[Input, torch.Tensor]:
        wanted = set()
        for key in keys:
            wanted |= merged_inputs(key, self.merges) if merged else {key}
        raw = self.read_names([self.name_of(k) for k in wanted])
        values = {k: raw[self.name_of(k)] for k in wanted}
        for op in self.merges if merged else ():  # in order
            for layer, name in [k for k in values if k[0] == op.into]:
                values[layer, name] = merged_value(values[layer, name], [values[i, name] for i in op.layers])
        return {k: values[k] for k in keys}


@torch.no_grad()
def compute(unit: list[Recipe], originals: Originals, plan: FoldPlan, context: Context) -> Iterator[tuple]:
    """(name, tensor) for every recipe of one unit."""
    values = originals.read(list(dict.fromkeys(k for r in unit for k in r.inputs)))
    first = unit[0]
    if first.op is None:
        yield first.name, first.detail["value"] if first.role == "value" else values[first.inputs[0]]
        return
    op = plan.operation(first.op)
    yield from implementation(op).compute(op, unit, values, context)


# ---- the in-memory path ---------------------------------------------------------------------------------
def fold_in_memory(
    model: nn.Module,
    plan: FoldPlan,
    *,
    base_config: dict,
    base_architecture: str,
    statistics=None,
    progress: bool = False,
    then: Callable[[list, Originals, dict], None] | None = None,
) -> FoldState:
    """Fold ``model`` in place: build the structure, then run every unit over the model's own tensors. The
    original tensors stay readable (by their original names) until the last unit is done, and ``then(units,
    originals, targets)`` may compute units again (the sequential fit, ``layerfold.engine.sequential``)."""
    if plan.whitens() and statistics is None:
        raise LayerfoldError(f"the plan's {plan.calibrated_steps()} need calibration text (--calib PATH)")
    family = family_of(model)
    layer_prefix = layer_prefixes(model, family)
    snapshot = model.state_dict()  # detached views by original name, kept while the structure changes
    state = apply_structure(model, plan, base_config=base_config, base_architecture=base_architecture)
    recipes, _ = recipes_for(model, plan, layer_prefix)
    targets = model.state_dict(keep_vars=True)
    originals = Originals(lambda names: {n: snapshot[n] for n in names}, layer_prefix, plan)
    context = Context(
        gram=statistics.gram if statistics is not None else None,
        cache=statistics.cache if statistics is not None else None,
    )
    merged_into = {op.into for op in plan.merges()}
    # Copied tensors are the model's own already, unless a merge writes into their layer.
    units = [u for u in units_of(recipes, plan.num_layers) if u[0].op is not None or _reads(u, merged_into)]
    for unit in tqdm(units, desc="folding", unit="unit", disable=not progress or not units):
        for name, value in compute(unit, originals, plan, context):
            target = targets[name]
            if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
                raise LayerfoldError(
                    f"internal error: {name} is {tuple(value.shape)} {value.dtype}, its module {tuple(target.shape)} "
                    f"{target.dtype}"
                )
            target.data = value  # a new tensor: the original's stays readable for later units
    if then is not None:
        then(units, originals, targets)
    return state


def _reads(unit: list[Recipe], layers: set[int]) -> bool:
    """Whether a unit reads a tensor of one of ``layers``."""
    return any(i in layers for r in unit for i, _ in r.inputs if i is not None)
