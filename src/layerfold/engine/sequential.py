"""Sequential calibration: fit each layer to the inputs the *folded* layers before it produce.

A plain fold fits every calibrated operation (whitened factorisations, least-squares ties, whitened
relaxations) to the original model's inputs Xᵢ of each layer. At run time layer i sees the folded model's
inputs X̃ᵢ instead, and the errors compound through depth. The fit that accounts for it minimises
‖Xᵢ Wᵢᵀ − X̃ᵢ Mᵀ‖² (the original's outputs as targets, the folded inputs as inputs). It splits exactly into
‖Xᵢ Wᵢᵀ − X̃ᵢ Ŵᵢᵀ‖² + ‖X̃ᵢ (Ŵᵢ − M)ᵀ‖², with Ŵᵢ = Wᵢ Kᵢ G̃ᵢ⁻¹ the least-squares map from the folded inputs to
the original outputs (Kᵢ = XᵢᵀX̃ᵢ, G̃ᵢ = X̃ᵢᵀX̃ᵢ): so every operation's own fit, given Ŵᵢ for the weight and G̃ᵢ
for the Gram matrix, is the sequential fit — no operation has code for it (as GPTQ's sequential mode and
SVD-LLM's parameter update do).

``refit`` runs after the ordinary fold (``engine.fold_in_memory``): it walks the calibration batches through the
original and the folded model side by side, block by block; at each layer it measures G̃ and K for what the
calibrated operations read there, recomputes the units whose last layer this is, and only then carries the
folded hidden states through the refitted block. A unit spanning several layers (a tie cycle, a basis group)
sees its later members' inputs through its earlier members as first fitted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import BlockWalk
from .execute import Context, Originals, compute, gram_needs, last_layer
from ..core.families import family_of, is_transposed
from ..operations import Recipe
from ..operations.plan import FoldPlan

# The retargeted weight also pays λ‖Ŵ − W‖², λ this fraction of G̃'s mean diagonal: where the folded inputs carry
# no energy in some direction the map is not determined by the data, and there it stays the original weight.
RETARGET_DAMPING = 1e-3


def retarget(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Ŵ = argmin ‖X Wᵀ − X̃ Ŵᵀ‖² + λ‖Ŵ − W‖² = (W K + λW)(G̃ + λI)⁻¹ (nn.Linear layout, out×in; K = XᵀX̃,
    G̃ = X̃ᵀX̃), in float64, returned in W's dtype. When X̃ = X it is W exactly."""
    regularised = gram.double().clone()
    damping = RETARGET_DAMPING * float(regularised.diagonal().mean().clamp(min=1e-12))
    regularised.diagonal().add_(damping)
    w = weight.detach().double()
    # Ŵ (G̃ + λI) = W K + λW  ⇔  (G̃ + λI) Ŵᵀ = Kᵀ Wᵀ + λWᵀ (G̃ symmetric). A pruned width (fewer folded inputs
    # than original ones) has no W of Ŵ's shape to stay near: there the ridge pulls towards zero.
    anchor = damping * w.T if cross.shape[0] == cross.shape[1] else 0.0
    solved = torch.linalg.solve(regularised, cross.double().T @ w.T + anchor).T
    return solved.to(weight.dtype)


class _Measured:
    """G̃ and K of one (layer, projection), accumulated over batches; ``same`` while X̃ equals X bit for bit
    (then the original's own fit stands: nothing before this input has changed)."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.same = True

    def add(self, original_rows: torch.Tensor, folded_rows: torch.Tensor) -> None:
        self.same = self.same and torch.equal(original_rows, folded_rows)
        gram = (folded_rows.T @ folded_rows).double()
        cross = (original_rows.T @ folded_rows).double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross


@torch.no_grad()
def refit(
    original: nn.Module,
    folded: nn.Module,
    plan: FoldPlan,
    units: list[list[Recipe]],
    originals: Originals,
    statistics,
    targets: dict[str, torch.Tensor],
    *,
    progress: bool = False,
) -> None:
    """Recompute the calibrated units of a folded model on its own inputs (see the module docstring).
    ``original`` is an unfolded copy; ``targets`` the folded model's tensors."""
    family = family_of(original)
    needs = gram_needs(plan, family)
    calibrated = [u for u in units if u[0].op is not None and any(p in needs.get(i, ()) for i, p in _reads(u))]
    if not calibrated:
        return
    by_layer: dict[int, list[list[Recipe]]] = defaultdict(list)
    for unit in calibrated:  # in the engine's order
        by_layer[min(last_layer(unit, plan.num_layers), plan.num_layers - 1)].append(unit)
    kept = plan.kept_layers()
    position = {layer: p for p, layer in enumerate(kept)}
    original_layers = family.layer_list(original)
    original.eval(), folded.eval()
    batches = statistics.batches
    original_walk, folded_walk = BlockWalk(original, batches), BlockWalk(folded, batches)
    measured: dict[tuple[int, str], _Measured] = {}
    last = max(by_layer)
    for i in tqdm(range(last + 1), desc="sequential fit", unit="block", disable=not progress):
        wanted = sorted(needs.get(i, ()))
        rows: dict[tuple[str, int], torch.Tensor] = {}
        stages: dict[int, list[str]] = {}  # projections that read one input, in the order the block runs them

        def record(name, b, x):
            rows[name, b] = x
            if b == 0:
                stages.setdefault(id(x), []).append(name)

        original_walk.measure(i, wanted, on_input=record)
        if i not in position:
            continue
        context = Context(gram=lambda layer, name: _gram(measured, statistics, layer, name), cache=None)
        sources = _Retargeted(originals, measured, original_layers)
        pending = list(by_layer.get(i, ()))
        # Stage by stage, so that a projection is measured after the ones before it in the block are refitted
        # (o_proj after q, k, v; down after gate and up): it must not correct an error they no longer make.
        done: set[str] = set()  # the projections of block i measured so far
        for n, stage in enumerate(stages.values()):
            for name in stage:
                measured[i, name] = _Measured()

            def collect(name, b, x, i=i):
                measured[i, name].add(rows[name, b], x)

            folded_walk.measure(position[i], stage, on_input=collect, advance=False)
            done |= set(stage)
            last_stage = n == len(stages) - 1
            ready = [u for u in pending if last_stage or {p for j, p in _reads(u) if j == i} <= done]
            for unit in ready:
                pending.remove(unit)
                if all(measured[k].same for k in _reads(unit) if k in measured):
                    continue  # nothing before its inputs changed: the first fit is the sequential one
                for name, value in compute(unit, sources, plan, context):
                    targets[name].data = value
        del rows
        folded_walk.measure(position[i])  # through the refitted block, for the layers after it


def _reads(unit: list[Recipe]) -> set[tuple[int, str]]:
    """The (layer, projection) pairs whose tensors a unit reads."""
    return {(i, name.rsplit(".", 1)[0]) for r in unit for i, name in r.inputs if i is not None}


def _gram(measured: dict, statistics, layer: int, name: str) -> torch.Tensor:
    entry = measured.get((layer, name))
    if entry is None or entry.same:
        return statistics.gram(layer, name)
    return entry.gram


class _Retargeted:
    """``Originals`` whose projection weights are replaced by their retargeted Ŵ where the folded inputs differ."""

    def __init__(self, originals: Originals, measured: dict, original_layers: Sequence[nn.Module]) -> None:
        self.originals, self.measured, self.original_layers = originals, measured, original_layers

    def read(self, keys: list[tuple], *, merged: bool = True) -> dict[tuple, torch.Tensor]:
        values = self.originals.read(keys, merged=merged)
        for (layer, name), value in list(values.items()):
            projection, _, attr = name.rpartition(".")
            entry = self.measured.get((layer, projection))
            if attr != "weight" or entry is None or entry.same:
                continue
            transposed = is_transposed(self.original_layers[layer].get_submodule(projection))
            linear = value.t() if transposed else value
            fitted = retarget(linear, entry.cross, entry.gram)
            values[layer, name] = (fitted.t() if transposed else fitted).contiguous()
        return values
