"""What a ``tie`` operation does: the layers of a group share one weight per projection, held once in the
store under the operation's key; each keeps its own bias, norms and LoRA relaxation.

``build`` makes the modules (empty tensors); ``store_recipe``/``layer_recipe`` say which original tensors each
stored tensor is computed from; ``compute`` computes one unit — a projection's shared weight (and bias) and
every tied layer's relaxation of it — the same in memory and streamed.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.families import Family, is_transposed, linear_weight
from ...core.store import FoldState, ensure_path
from ..base import Recipe
from ..factor.decompose import decompose
from .forms import form_of
from .modules import FormTiedLinear, SharedProjection, TiedLinear
from .relax import lora_from_delta, resolve_rank
from .spec import Tie


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A tie group's shared tensor: the mean of its sources (computed in float32, stored in their dtype)."""
    if len(tensors) == 1:
        return tensors[0].detach().clone()
    total = torch.stack([t.detach().float() for t in tensors]).mean(dim=0)
    return total.to(tensors[0].dtype)


# The least-squares fit adds this fraction of the mean input energy (the Gram matrices' mean diagonal) times
# ‖Wᵢ − W‖² to its objective: it keeps the solve well conditioned where some input directions carry no energy,
# and it pulls only towards the mean of the members, so one member, or identical members, are reproduced
# exactly and the fit is never worse than the mean on the calibration data.
LSTSQ_DAMPING = 1e-3


def least_squares(weights: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """The shared weight W (nn.Linear layout, out×in) minimising Σᵢ ‖(Wᵢ − W) Xᵢᵀ‖² + λ Σᵢ ‖Wᵢ − W‖², with
    Gᵢ = XᵢᵀXᵢ the Gram matrix of member i's inputs: W = (Σ Wᵢ Gᵢ + λ Σ Wᵢ) (Σ Gᵢ + nλI)⁻¹, in float64."""
    total = sum(g.double() for g in grams)
    damping = LSTSQ_DAMPING * float(total.diagonal().mean().clamp(min=1e-12)) / len(grams)
    members = [w.detach().double() for w in weights]
    right = sum(w @ g.double() for w, g in zip(members, grams)) + damping * sum(members)
    total.diagonal().add_(damping * len(grams))
    # W · total = right; total is symmetric positive definite.
    solved = torch.linalg.solve(total, right.T).T
    return solved.to(weights[0].dtype)


def relaxation(
    original: torch.Tensor, shared: torch.Tensor, *, transposed: bool, rank: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A, B) of one tied layer: the truncated SVD of its original weight (nn.Linear layout)
    minus the shared weight (in the module's own layout); with ``gram`` (its inputs' XᵀX), the SVD in the space
    whitened by its inputs, which minimises the error of its outputs on the calibration data (as svd does)."""
    shared_weight = shared.t() if transposed else shared
    delta = original.detach() - shared_weight.detach()
    if gram is None or rank == 0:
        return lora_from_delta(delta, rank)
    basis, (coefficients,) = decompose([delta], gram, layers=(), projection="relaxation").factors(rank, delta.dtype)
    return basis, coefficients


def build(model: nn.Module, family: Family, key: str, op: Tie, state: FoldState) -> None:
    """Replace the shared projections of ``op``'s layers by TiedLinear modules (or, for another relaxation form,
    FormTiedLinear) over one SharedProjection each, held in ``state[key]``."""
    layers = family.layer_list(model)
    entry = nn.Module()
    for path in family.shared_projections(op.share):
        template = layers[op.layers[0]].get_submodule(path)
        kind = family.kind_of(path)
        shape = tuple(linear_weight(template).shape)
        form_name = op.relax_for(path, kind)
        form = form_of(op, form_name) if form_name != "lora" else None
        rank = op.form_rank(path, kind, shape) if form else resolve_rank(op.rank_for(path, kind), shape)
        pool = form.pool_shapes(rank, *shape) if form else {}
        share_bias = op.share_bias and template.bias is not None
        shared = SharedProjection(
            torch.empty_like(template.weight),
            torch.empty_like(template.bias) if share_bias else None,
            transposed=is_transposed(template),
            pool={name: template.weight.new_empty(size) for name, size in pool.items()},
        )
        ensure_path(entry, path).add_module(path.rsplit(".", 1)[-1], shared)
        for i in op.layers:
            original = layers[i].get_submodule(path)
            common = dict(transposed=is_transposed(original), bias=None if shared.bias is not None else original.bias,
                          rank=rank, dtype=original.weight.dtype, device=original.weight.device)  # fmt: skip
            tied = FormTiedLinear(shared, form, seed=op.seed, **common) if form else TiedLinear(shared, **common)
            tied.op_key = key
            layers[i].set_submodule(path, tied)
    state[key] = entry


def store_recipe(name: str, key: str, op: Tie, path: str, attr: str, module: nn.Module) -> Recipe:
    """A shared weight (or bias): fitted to the sources' tensors (the mean, or for a weight least squares); a
    relaxation form's pool: fitted to every tied layer's residual."""
    detail = {"attr": attr, "transposed": module.transposed}
    if attr not in ("weight", "bias"):
        inputs = [(i, f"{path}.weight") for i in dict.fromkeys([*op.sources, *op.layers])]
        return Recipe(name, "pool", inputs, key, (path,), detail)
    return Recipe(name, "shared", [(i, f"{path}.{attr}") for i in op.sources], key, (path,), detail)


def layer_recipe(name: str, key: str, op: Tie, layer: int, path: str, attr: str, module: nn.Module) -> Recipe | None:
    """A tied layer's relaxation tensor (LoRA factor or its form's); its bias (not shared) is copied (None)."""
    inputs = [(j, f"{path}.weight") for j in op.sources] + [(layer, f"{path}.weight")]
    if isinstance(module, FormTiedLinear) and attr in module.form.layer_shapes(module.form_rank, 1, 1):
        detail = {"layer": layer, "attr": attr, "transposed": module.transposed, "form": module.form.name,
                  "rank": module.form_rank}  # fmt: skip
        return Recipe(name, "form", inputs, key, (path,), detail)
    if attr not in ("lora_A", "lora_B"):
        return None
    detail = {"layer": layer, "rank": module.rank, "transposed": module.transposed}
    return Recipe(name, attr, inputs, key, (path,), detail)


def gram_needs(op: Tie, family: Family) -> list[tuple[int, str]]:
    """The Gram matrices a tie needs, for every projection it shares: its sources' for a least-squares fit,
    its layers' for whitened relaxations."""
    layers = set(op.sources if op.fit == "lstsq" else ()) | set(op.layers if op.whiten else ())
    return [(i, path) for i in sorted(layers) for path in family.shared_projections(op.share)]


def compute(op: Tie, unit: list[Recipe], values: dict, context) -> tuple:
    """One projection of a tie group: its shared tensors first, then each tied layer's relaxation."""
    path = unit[0].unit[0]
    transposed = next(r.detail["transposed"] for r in unit if "transposed" in r.detail)
    grams: dict[int, torch.Tensor] = {}

    def gram(i: int) -> torch.Tensor:
        if i not in grams:
            grams[i] = context.gram(i, path)
        return grams[i]

    shared = {}
    for recipe in unit:
        if recipe.role != "shared":
            continue
        members = [values[k] for k in recipe.inputs]
        if recipe.detail["attr"] == "weight" and op.fit == "lstsq":
            linear = [m.t() if transposed else m for m in members]
            fitted = least_squares(linear, [gram(i) for i in op.sources])
            shared["weight"] = (fitted.t() if transposed else fitted).contiguous()
        else:
            shared[recipe.detail["attr"]] = average(members)
        yield recipe.name, shared[recipe.detail["attr"]]
    yield from _form_tensors(op, unit, values, shared["weight"], transposed, gram)
    factors: dict[int, tuple] = {}
    for recipe in unit:
        if recipe.role in ("lora_A", "lora_B"):
            i = recipe.detail["layer"]
            if i not in factors:
                weight = values[i, f"{path}.weight"]
                factors[i] = relaxation(
                    weight.t() if recipe.detail["transposed"] else weight,
                    shared["weight"],
                    transposed=recipe.detail["transposed"],
                    rank=recipe.detail["rank"],
                    gram=gram(i) if op.whiten else None,
                )
            yield recipe.name, factors[i][0 if recipe.role == "lora_A" else 1]


def _form_tensors(op: Tie, unit: list[Recipe], values: dict, shared: torch.Tensor, transposed: bool, gram):
    """A relaxation form's pool and per-layer tensors of one projection, fitted together to every tied layer's
    residual (original − shared, nn.Linear layout, float64), whitened by each layer's inputs with ``whiten``."""
    wanted = [r for r in unit if r.role in ("pool", "form")]
    if not wanted:
        return
    path = unit[0].unit[0]
    shared_weight = (shared.t() if transposed else shared).double()
    residuals = {}
    for i in op.layers:
        weight = values[i, f"{path}.weight"]
        residuals[i] = (weight.t() if transposed else weight).double() - shared_weight
    detail = next(r.detail for r in wanted if r.role == "form")  # every form stores per-layer tensors
    form = form_of(op, detail["form"])
    grams = {i: gram(i) if op.whiten else None for i in op.layers}
    pool, layers = form.fit(residuals, grams, detail["rank"], op.seed)
    for recipe in wanted:
        attr = recipe.detail["attr"]
        tensor = pool[attr] if recipe.role == "pool" else layers[recipe.detail["layer"]][attr]
        yield recipe.name, tensor.to(recipe.dtype).contiguous()


def relaxation_params(op: Tie, family: Family, block: nn.Module, rank: int | None = None) -> int:
    """What ``op``'s relaxations store over its group (every projection, in its form), at ``rank`` for every
    projection if given, else at the op's own ranks."""
    total = 0
    for path in family.shared_projections(op.share):
        kind = family.kind_of(path)
        shape = tuple(linear_weight(block.get_submodule(path)).shape)
        form_name = op.relax_for(path, kind)
        value = rank if rank is not None else (op.form_rank(path, kind, shape) if form_name != "lora"
                                               else resolve_rank(op.rank_for(path, kind), shape))  # fmt: skip
        if form_name == "lora":
            total += len(op.layers) * value * sum(shape)
        else:
            total += form_of(op, form_name).params(value, *shape, len(op.layers))
    return total


def max_relaxation_rank(op: Tie, family: Family, block: nn.Module) -> int:
    """The largest rank any projection of ``op`` can use in its form."""
    ranks = []
    for path in family.shared_projections(op.share):
        shape = tuple(linear_weight(block.get_submodule(path)).shape)
        form_name = op.relax_for(path, family.kind_of(path))
        ranks.append(min(shape) if form_name == "lora" else form_of(op, form_name).max_rank(*shape))
    return min(ranks)


def sync(model: nn.Module, family: Family, key: str, op: Tie, kept: list[int]) -> None:
    """Make ``op`` say the relaxation ranks its layers have, before a save: a PEFT LoRA merged into a tied layer
    (``TiedLinear.add_low_rank``) grows that layer's rank. Per projection, every layer of the group then gets
    the group's largest rank (the others padded with zeros, which changes nothing) — at most the matrix's full
    rank, refactored exactly (SVD of the merged update) where the sum went above it."""
    layers = family.layer_list(model)
    position = {layer: i for i, layer in enumerate(kept)}
    ranks, changed = {}, False
    for path in family.shared_projections(op.share):
        modules = [layers[position[i]].get_submodule(path) for i in op.layers if i in position]
        if not modules or not all(isinstance(m, TiedLinear) for m in modules):
            ranks[path] = op.rank_for(path, family.kind_of(path))  # a form relaxation: as planned
            continue
        limit = min(modules[0].out_features, modules[0].in_features)
        planned = resolve_rank(op.rank_for(path, family.kind_of(path)), (modules[0].out_features, limit))
        for module in modules:
            if module.rank > limit:
                lora_a, lora_b = lora_from_delta(module.lora_B.detach() @ module.lora_A.detach(), limit)
                module.set_relaxation(lora_a, lora_b, trainable=module.lora_A.requires_grad)
        largest = max(module.rank for module in modules)
        for module in modules:
            if module.rank < largest:
                missing = largest - module.rank
                module.add_low_rank(
                    torch.zeros(module.out_features, missing, dtype=module.weight.dtype, device=module.weight.device),
                    torch.zeros(missing, module.in_features, dtype=module.weight.dtype, device=module.weight.device),
                )
        ranks[path] = largest
        changed |= largest != planned
    if changed:
        op.rank = ranks
