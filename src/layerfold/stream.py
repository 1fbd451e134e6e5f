"""Fold a checkpoint larger than memory, a few tensors at a time.

The original and the folded model are built on the meta device (shapes, no storage); the folded model's
structure comes from the same ``apply_structure`` that ``layerfold.load`` uses, so the output has exactly the
tensors an in-memory fold would write. Each stored tensor of the folded model gets a recipe (copy an original
tensor, average a tie group's sources, relax one tied layer, factorise a projection over a group of layers),
recipes that read the same original tensors form a unit, and units run one at a time: read their tensors from
the checkpoint's shards, compute with the very functions the in-memory fold uses, hand the results to a shard
writer, forget them. So memory holds one tie group's projection (or one factor group) plus one output shard.

Whitened factorisations need the Gram matrices of their inputs on calibration text: the calibration batches'
hidden states walk the original stack block by block (``calibrate.BlockWalk``), with only the current block's
weights loaded, and a factor group is folded (and its Gram matrices freed) as soon as the walk has passed its
last layer.
"""

from __future__ import annotations

import copy
import re
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm

from .calibrate import BlockWalk
from .checkpoint import DEFAULT_MAX_SHARD_BYTES, TORCH_DTYPES, ShardWriter, SourceCheckpoint
from .errors import LayerfoldError
from .families import family_of, is_transposed
from .folding import apply_structure
from .io import source_config, weights_metadata, write_folded_config
from .outputs import atomic_output_dir, check_output
from .operations import Factor, Tie
from .operations.factor.decompose import decompose, summed_gram
from .operations.factor.modules import BasisLinear, SharedBasis
from .operations.merge.build import merged_value
from .operations.tie.build import average, relaxation
from .operations.tie.modules import SharedProjection, TiedLinear
from .plan import FoldPlan
from .store import fold_state
from .report import parameter_breakdown, weight_bytes

# An input of a recipe: (original layer index, name inside the block) or (None, full tensor name).
Input = tuple


@dataclass
class Recipe:
    name: str  # the folded model's (stored) tensor name
    kind: str  # copy | value | shared | lora_A | lora_B | basis | coefficients
    inputs: list[Input]
    detail: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


# Methods whose plan follows from the shapes alone (uniform basis/svd ranks too): what a streamed fold can plan.
STREAMABLE_METHODS = ("drop-first", "drop-even", "tie-cycle", "tie-sequence", "basis", "svd")


def method_plan(method: str, budget, options: dict | None = None) -> Callable[[nn.Module], FoldPlan]:
    """The plan a registered method makes at ``budget``, as a function of the original on the meta device."""
    from .methods import registry
    from .methods.basis import factor_plan

    chosen = registry.get(method)
    options = dict(options or {})
    if method not in STREAMABLE_METHODS:
        raise LayerfoldError(
            f"method {method} measures the whole model before it plans; with --stream use one of "
            f"{', '.join(STREAMABLE_METHODS)} or a --plan file"
        )
    registry.check_options(chosen, options)
    if method in ("basis", "svd"):
        if options.setdefault("allocation", "uniform") != "uniform":
            raise LayerfoldError(
                f"--allocation {options['allocation']} ranks every matrix's spectrum first; with --stream use "
                "--allocation uniform"
            )
        if method == "svd":
            options["group_size"] = 1
        return lambda model: factor_plan(model, None, budget, method=method, whiten=True, **options)
    return lambda model: chosen.plan(model, budget, None, **options)


def _build(model_class, config, dtype: torch.dtype) -> nn.Module:
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(copy.deepcopy(config), dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding, stored once
    return model.eval()


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """The (checkpoint pattern, model name) renames transformers applies when it loads this class (e.g. GPT-NeoX's
    ``embed_out`` is now ``lm_head``)."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    pairs = []
    for transform in extract_weight_conversions_for_model(model) or []:
        if type(transform) is WeightRenaming:
            sources, targets = transform.source_patterns, transform.target_patterns
            sources = [sources] if isinstance(sources, str) else list(sources)
            targets = [targets] if isinstance(targets, str) else list(targets)
            pairs += list(zip(sources, targets))
    return pairs


class _Resolver:
    """Maps the model's tensor names to the checkpoint's, which may lack or add the base model prefix or use
    names transformers renames on load."""

    def __init__(self, checkpoint: SourceCheckpoint, model: nn.Module) -> None:
        self.available = set(checkpoint.names())
        prefix = getattr(model, "base_model_prefix", "")
        self.prefix = prefix + "." if prefix else ""
        self.renamed = {}
        for pattern, target in _renamings(model):
            for name in self.available:
                new = re.sub(pattern, target, name)
                if new != name:
                    self.renamed[new] = name

    def __call__(self, name: str) -> str:
        candidates = [name]
        if self.prefix:
            candidates += [self.prefix + name, name.removeprefix(self.prefix)]
        for candidate in candidates:
            if candidate in self.available:
                return candidate
            if candidate in self.renamed:
                return self.renamed[candidate]
        raise LayerfoldError(f"the checkpoint has no tensor {name}: it does not match its config.json")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _recipes(original: nn.Module, folded: nn.Module, plan: FoldPlan) -> tuple[list[Recipe], dict[str, str], dict]:
    """A recipe for every tensor the folded model stores, its aliases (as ``io._unique_state`` finds them), and
    each original layer's name prefix."""
    family = family_of(original)
    original_layers = family.layer_list(original)
    folded_layers = family.layer_list(folded)
    kept = plan.kept_layers()
    state = fold_state(folded)
    layer_of = {id(block): kept[p] for p, block in enumerate(folded_layers)}
    module_of_param: dict[int, tuple[nn.Module, str]] = {}
    for module in folded.modules():
        for attr, param in list(module._parameters.items()) + list(module._buffers.items()):
            if param is not None and id(param) not in module_of_param:
                module_of_param[id(param)] = (module, attr)
    # Which folded layer (block) owns each module, and the module's path inside it.
    block_of: dict[int, tuple[int, str]] = {}
    for block in folded_layers:
        for path, module in block.named_modules():
            block_of.setdefault(id(module), (layer_of[id(block)], path))
    state_entry: dict[int, tuple[str, str]] = {}
    for key, entry in state.items():
        for path, module in entry.named_modules():
            state_entry[id(module)] = (key, path)
    keyed = plan.keyed()
    tie_of = {i: (key, op) for key, op in keyed if isinstance(op, Tie) for i in op.layers}
    factor_of = {(i, op.projection): (key, op) for key, op in keyed if isinstance(op, Factor) for i in op.layers}
    operation = dict(keyed)
    original_names = _module_names(original)
    layer_prefix = {i: original_names[id(block)] + "." for i, block in enumerate(original_layers)}

    recipes: list[Recipe] = []
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in folded.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        module, attr = module_of_param[id(tensor)]
        if attr in module._buffers and tensor.device.type != "meta":
            # A persistent buffer the model computes itself (built with real buffers): stored as computed.
            recipes.append(Recipe(name, "value", [], {"value": tensor.detach().clone()}))
        elif id(module) in state_entry:
            key, path = state_entry[id(module)]
            op = operation[key]
            if isinstance(module, SharedProjection):
                inputs = [(i, f"{path}.{attr}") for i in op.sources]
                recipes.append(Recipe(name, "shared", inputs, {"key": key, "path": path, "attr": attr}))
            elif isinstance(module, SharedBasis):
                inputs = [(i, f"{op.projection}.weight") for i in op.layers]
                recipes.append(Recipe(name, "basis", inputs, {"key": key}))
            else:
                raise LayerfoldError(f"streamed fold: no recipe for {name}")
        elif id(module) in block_of:
            i, path = block_of[id(module)]
            if isinstance(module, TiedLinear) and attr in ("lora_A", "lora_B"):
                key, op = tie_of[i]
                inputs = [(j, f"{path}.weight") for j in op.sources] + [(i, f"{path}.weight")]
                detail = {"key": key, "path": path, "layer": i, "rank": module.rank, "transposed": module.transposed}
                recipes.append(Recipe(name, attr, inputs, detail))
            elif isinstance(module, BasisLinear) and attr == "coefficients":
                key, op = factor_of[i, path]
                inputs = [(j, f"{path}.weight") for j in op.layers]
                recipes.append(Recipe(name, "coefficients", inputs, {"key": key, "layer": i}))
            else:
                recipes.append(Recipe(name, "copy", [(i, f"{path}.{attr}" if path else attr)]))
        else:
            recipes.append(Recipe(name, "copy", [(None, name)]))
        recipes[-1].shape, recipes[-1].dtype = tuple(tensor.shape), tensor.dtype
    return recipes, aliases, layer_prefix


def _units(recipes: list[Recipe], plan: FoldPlan) -> list[list[Recipe]]:
    """Recipes that compute together: a tie group's projection (shared weight and its layers' relaxations), a
    factor group, or one copied tensor; ordered by the last original layer they read."""
    keyed: dict[tuple, list[Recipe]] = defaultdict(list)
    for recipe in recipes:
        if recipe.kind in ("shared", "lora_A", "lora_B"):
            key = ("tie", recipe.detail["key"], recipe.detail["path"])
        elif recipe.kind in ("basis", "coefficients"):
            key = ("factor", recipe.detail["key"])
        else:
            key = ("copy", recipe.name)
        keyed[key].append(recipe)

    return sorted(keyed.values(), key=lambda unit: _last_layer(unit, plan.num_layers))


def _last_layer(unit: list[Recipe], num_layers: int) -> int:
    """The last original layer a unit reads (``num_layers`` for embeddings and heads: they come last)."""
    return max((i for r in unit for i, _ in r.inputs if i is not None), default=num_layers)


class _Originals:
    """Original tensors by (layer, name in block) or (None, name), read from the checkpoint with the plan's
    LaCo merges applied (as ``merge_layers`` does before tying)."""

    def __init__(self, checkpoint: SourceCheckpoint, resolve: _Resolver, layer_prefix: dict, plan: FoldPlan):
        self.checkpoint, self.resolve, self.layer_prefix, self.merges = checkpoint, resolve, layer_prefix, plan.merges()

    def name_of(self, key: Input) -> str:
        """The checkpoint's name of an input."""
        layer, name = key
        return self.resolve(name if layer is None else self.layer_prefix[layer] + name)

    def _needed(self, key: Input) -> set:
        """``key`` and every tensor its merged value is made of (merges can chain: a layer merged into
        another may itself have been merged into before)."""
        layer, name = key
        needed = {key}
        while layer is not None:
            layers = {k[0] for k in needed}
            more = {(i, name) for op in self.merges if op.into in layers for i in op.layers}
            if more <= needed:
                break
            needed |= more
        return needed

    def read(self, keys: list[Input], *, merged: bool = True) -> dict[Input, torch.Tensor]:
        """``merged=False``: the checkpoint's own tensors (what calibration measures)."""
        wanted = set()
        for key in keys:
            wanted |= self._needed(key) if merged else {key}
        raw = self.checkpoint.read(self.name_of(k) for k in wanted)
        values = {k: raw[self.name_of(k)] for k in wanted}
        for op in self.merges if merged else ():  # in order, like merge_layers
            for layer, name in [k for k in values if k[0] == op.into]:
                values[layer, name] = merged_value(values[layer, name], [values[i, name] for i in op.layers])
        return {k: values[k] for k in keys}


def stream_fold(
    source: str | Path,
    out: str | Path,
    plan_for: FoldPlan | Callable[[nn.Module], FoldPlan],
    *,
    calibration: Callable[[nn.Module], list[dict]] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    other_inputs: dict[str, str | Path | None] | None = None,
    progress: bool = True,
) -> dict:
    """Fold the checkpoint folder ``source`` into ``out`` without loading it (see the module docstring).

    ``plan_for``: a plan, or a function of the original model on the meta device. ``calibration``: a function
    of that model returning calibration batches, for plans that whiten their factorisations."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise LayerfoldError(f"model folder not found: {source} (streamed folding reads a checkpoint folder)")
    check_output(out, {"original model": source, **(other_inputs or {})}, overwrite=overwrite)
    config, model_class = source_config(source)
    checkpoint = SourceCheckpoint(source)
    float_dtypes = [TORCH_DTYPES[d] for d in checkpoint.dtypes.values() if d in ("F16", "BF16", "F32", "F64")]
    dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
    original = _build(model_class, config, dtype)
    family = family_of(original)
    plan = plan_for if isinstance(plan_for, FoldPlan) else plan_for(original)
    plan.validate(original)
    folded = _build(model_class, config, dtype)
    apply_structure(
        folded,
        plan,
        base_config=original.config.to_dict(),
        base_architecture=type(original).__name__,
        initialize=False,
    )
    before = {"parameters": parameter_breakdown(original), "bytes_on_disk": weight_bytes(source)}
    after_parameters = parameter_breakdown(folded)
    recipes, aliases, layer_prefix = _recipes(original, folded, plan)
    originals = _Originals(checkpoint, _Resolver(checkpoint, original), layer_prefix, plan)
    for recipe in recipes:  # every input exists before any work starts
        for key in recipe.inputs:
            originals.name_of(key)
    units = _units(recipes, plan)

    whitened = plan.whitens()
    if whitened and calibration is None:
        raise LayerfoldError("the plan whitens its factorisations: it needs calibration text (--calib PATH)")
    gram_needs: dict[int, set[str]] = defaultdict(set)
    if whitened:
        for op in plan.factors():
            for i in op.layers if op.whiten else ():
                gram_needs[i].add(op.projection)
    grams: dict[tuple[int, str], torch.Tensor] = {}
    walk = None
    if whitened:
        _materialize_embeddings(original, originals, family)
        walk = BlockWalk(original, calibration(original))
    with atomic_output_dir(out, overwrite=overwrite, inputs={"original model": source, **(other_inputs or {})}) as tmp:
        writer = ShardWriter(
            tmp,
            [(r.name, r.shape, r.dtype) for unit in units for r in unit],
            max_shard_bytes=max_shard_bytes,
            metadata=weights_metadata(aliases),
        )
        try:
            walked = -1
            for unit in tqdm(units, desc="streamed fold", unit="unit", disable=not progress):
                last = min(_last_layer(unit, plan.num_layers), plan.num_layers - 1)
                while walk is not None and walked < last:
                    walked += 1
                    grams.update(_measure(walk, walked, original, originals, family, gram_needs.get(walked, ())))
                for name, tensor in _compute(unit, originals, plan, grams, family, original):
                    writer.add(name, tensor)
            writer.finish()
        finally:
            writer.close()
        if (source / "generation_config.json").is_file():
            folded.generation_config = transformers.GenerationConfig.from_pretrained(source)
        write_folded_config(folded, tmp, source=source)
    return {
        "model": str(source),
        "model_type": config.model_type,
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "plan": plan.to_dict(),
        "plan_summary": plan.describe(),
        "before": before,
        "after": {"parameters": after_parameters, "bytes_on_disk": weight_bytes(out)},
        "streamed": True,
        "units": len(units),
        "source_bytes": checkpoint.nbytes(),
        "output_bytes": writer.total_bytes,
        "shards": writer.shard_count,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _measure(walk, i: int, original: nn.Module, originals: _Originals, family, projections) -> dict:
    """Load block i alone, walk the calibration batches through it, unload it: its inputs' Gram matrices."""
    block = family.layer_list(original)[i]
    tensors = originals.read([(i, name) for name in block.state_dict()], merged=False)
    block.load_state_dict({name: value for (_, name), value in tensors.items()}, assign=True)
    del tensors
    _, _, accumulators = walk.measure(i, sorted(projections))
    block.to("meta")
    return {(i, p): gram for p, gram in accumulators.items()}


def _materialize_embeddings(original: nn.Module, originals: _Originals, family) -> None:
    """Load the tensors the calibration walk runs before the first block: the embeddings and their norms
    (everything outside the blocks but the output head, which the walk never reaches)."""
    skip = {id(p) for p in family.layer_list(original).parameters()}
    head = original.get_output_embeddings() if hasattr(original, "get_output_embeddings") else None
    tied = head is not None and any(head.weight is e.weight for e in original.modules() if isinstance(e, nn.Embedding))
    if head is not None and not tied:
        skip |= {id(p) for p in head.parameters()}
    names = [n for n, p in original.named_parameters() if id(p) not in skip]
    values = originals.read([(None, n) for n in names], merged=False)
    original.load_state_dict({n: values[None, n] for n in names}, assign=True, strict=False)
    if tied:
        original.tie_weights()


@torch.no_grad()
def _compute(unit, originals: _Originals, plan: FoldPlan, grams: dict, family, original):
    """Yield (name, tensor) for the recipes of one unit, computed as the in-memory fold computes them."""
    keys = list(dict.fromkeys(k for r in unit for k in r.inputs))
    values = originals.read(keys)
    kind = unit[0].kind
    if kind == "value":
        yield unit[0].name, unit[0].detail["value"]
        return
    if kind == "copy":
        yield unit[0].name, values[unit[0].inputs[0]]
        return
    if kind in ("shared", "lora_A", "lora_B"):
        path = unit[0].detail["path"]
        shared = {}  # the unit always holds its shared weight (and bias, if shared): computed first
        for recipe in unit:
            if recipe.kind == "shared":
                shared[recipe.detail["attr"]] = average([values[k] for k in recipe.inputs])
                yield recipe.name, shared[recipe.detail["attr"]]
        done: dict[int, tuple] = {}
        for recipe in unit:
            if recipe.kind in ("lora_A", "lora_B"):
                i = recipe.detail["layer"]
                if i not in done:
                    weight = values[i, f"{path}.weight"]
                    original_weight = weight.t() if recipe.detail["transposed"] else weight
                    done[i] = relaxation(
                        original_weight,
                        shared["weight"],
                        transposed=recipe.detail["transposed"],
                        rank=recipe.detail["rank"],
                    )
                yield recipe.name, done[i][0 if recipe.kind == "lora_A" else 1]
        return
    op = plan.operation(unit[0].detail["key"])
    members, projection = op.layers, op.projection
    module = family.layer_list(original)[members[0]].get_submodule(projection)
    transposed = is_transposed(module)
    weights = [values[i, f"{projection}.weight"] for i in members]
    weights = [w.t() if transposed else w for w in weights]
    gram = summed_gram([grams.pop((i, projection)) for i in members]) if op.whiten else None
    decomposition = decompose(weights, gram, layers=tuple(members), projection=projection)
    basis, coefficients = decomposition.factors(op.rank, values[members[0], f"{projection}.weight"].dtype)
    for recipe in unit:
        if recipe.kind == "basis":
            yield recipe.name, basis
        else:
            yield recipe.name, coefficients[members.index(recipe.detail["layer"])]
