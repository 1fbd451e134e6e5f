"""Fold a checkpoint larger than memory, a few tensors at a time.

The original and the folded model are built on the meta device (shapes, no storage); the folded model's
structure comes from the same ``apply_structure`` that ``layerfold.load`` uses, and the engine's recipes and
units (``layerfold.engine.execute``) are the in-memory fold's: here each unit reads its original tensors from the
checkpoint's shards, computes, hands the results to a shard writer and forgets them. So memory holds one tie
group's projection (or one factor group) plus one output shard.

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
from pathlib import Path
from typing import Callable

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm

from ..engine.calibrate import BlockWalk
from ..core.tensor_files import DEFAULT_MAX_SHARD_BYTES, TORCH_DTYPES, ShardWriter, SourceCheckpoint
from ..engine.execute import (
    Context,
    Originals,
    apply_structure,
    compute,
    gram_needs,
    last_layer,
    layer_prefixes,
    recipes_for,
    units_of,
)
from ..core.errors import LayerfoldError
from ..core.families import family_of
from ..checkpoints.folded import weights_metadata, write_folded_config
from ..checkpoints.output_guard import atomic_output_dir, check_output
from ..operations.plan import FoldPlan
from ..core.report import Size, parameter_breakdown, weight_bytes
from ..checkpoints.originals import concrete_class, source_config

def _build(model_class, config, dtype: torch.dtype) -> nn.Module:
    with init_empty_weights(include_buffers=False):
        model = concrete_class(model_class, config)._from_config(copy.deepcopy(config), dtype=dtype)
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
    of that model returning calibration batches, for plans that whiten their factorisations.

    Over 80 lines: the streamed path's whole schedule (checks, skeletons, recipes, the block walk that measures
    Gram matrices as units need them, the shard writer, the report) kept in one readable sequence."""
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
    layer_prefix = layer_prefixes(original, family)
    apply_structure(folded, plan, base_config=original.config.to_dict(), base_architecture=type(original).__name__)
    before = Size(parameter_breakdown(original), weight_bytes(source))
    after_parameters = parameter_breakdown(folded)
    recipes, aliases = recipes_for(folded, plan, layer_prefix)
    originals = Originals(checkpoint.read, layer_prefix, plan, _Resolver(checkpoint, original))
    for recipe in recipes:  # every input exists before any work starts
        for key in recipe.inputs:
            originals.name_of(key)
    units = units_of(recipes, plan.num_layers)

    whitened = plan.whitens()
    if whitened:
        plan.provenance = {**plan.provenance, "sequential": False}  # fitted to the original's inputs
    if whitened and calibration is None:
        raise LayerfoldError(f"the plan's {plan.calibrated_steps()} need calibration text (--calib PATH)")
    needs = gram_needs(plan, family)
    grams: dict[tuple[int, str], torch.Tensor] = {}
    # A unit's Gram matrices are freed as it takes them; decompositions are not kept (one unit in memory).
    context = Context(gram=lambda i, projection: grams.pop((i, projection)), cache=None)
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
                last = min(last_layer(unit, plan.num_layers), plan.num_layers - 1)
                while walk is not None and walked < last:
                    walked += 1
                    grams.update(_measure(walk, walked, original, originals, family, needs.get(walked, ())))
                for name, tensor in compute(unit, originals, plan, context):
                    writer.add(name, tensor)
            writer.finish()
        finally:
            writer.close()
        if (source / "generation_config.json").is_file():
            folded.generation_config = transformers.GenerationConfig.from_pretrained(source)
        write_folded_config(folded, tmp, source=source, name=Path(out).name)
    return {
        "model": str(source),
        "model_type": config.model_type,
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "plan": plan,
        "plan_summary": plan.describe(),
        "before": before,
        "after": Size(after_parameters, weight_bytes(out)),
        "streamed": True,
        "units": len(units),
        "source_bytes": checkpoint.nbytes(),
        "output_bytes": writer.total_bytes,
        "shards": writer.shard_count,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _measure(walk, i: int, original: nn.Module, originals: Originals, family, projections) -> dict:
    """Load block i alone, walk the calibration batches through it, unload it: its inputs' Gram matrices."""
    block = family.layer_list(original)[i]
    tensors = originals.read([(i, name) for name in block.state_dict()], merged=False)
    block.load_state_dict({name: value for (_, name), value in tensors.items()}, assign=True)
    del tensors
    _, _, accumulators = walk.measure(i, sorted(projections))
    block.to("meta")
    return {(i, p): gram for p, gram in accumulators.items()}


def _materialize_embeddings(original: nn.Module, originals: Originals, family) -> None:
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
