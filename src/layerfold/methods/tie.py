"""Layer tying: the layers of a group share one weight per projection (held once, in the FoldState);
each keeps its own bias, norms and relaxation."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..families import Family, is_transposed, linear_weight
from ..modules import FoldState, SharedProjection, TiedLinear, ensure_path
from ..plan import FoldPlan
from .relax import lora_from_delta, resolve_rank


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A tie group's shared tensor: the mean of its sources (computed in float32, stored in their dtype)."""
    if len(tensors) == 1:
        return tensors[0].detach().clone()
    total = torch.stack([t.detach().float() for t in tensors]).mean(dim=0)
    return total.to(tensors[0].dtype)


def relaxation(
    original: torch.Tensor, shared: torch.Tensor, *, transposed: bool, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A, B) of one tied layer: the truncated SVD of its original weight (nn.Linear layout)
    minus the shared weight (in the module's own layout)."""
    shared_weight = shared.t() if transposed else shared
    return lora_from_delta(original.detach() - shared_weight.detach(), rank)


def tie_layers(
    model: nn.Module, family: Family, plan: FoldPlan, state: FoldState, *, initialize: bool, progress: bool
) -> None:
    """Replace the shared projections of every tie group by TiedLinear modules.

    With ``initialize=False`` only the structure is built (empty tensors, e.g. on the meta device) for a
    checkpoint's weights to be loaded into.
    """
    layers = family.layer_list(model)
    projections = family.shared_projections(plan.share)
    sources = plan.init_sources()
    for _ in plan.groups:
        state.append(nn.Module())

    # All shared weights first: "lower"/"stepwise" may read a layer that another group ties later.
    shared: dict[tuple[int, str], SharedProjection] = {}
    for g, members in plan.tie_groups():
        for path in projections:
            template = layers[members[0]].get_submodule(path)
            originals = [layers[i].get_submodule(path) for i in sources[g]]
            share_bias = plan.share_bias and template.bias is not None
            if initialize:
                weight = average([m.weight for m in originals])
                bias = average([m.bias for m in originals]) if share_bias else None
            else:
                weight = torch.empty_like(template.weight)
                bias = torch.empty_like(template.bias) if share_bias else None
            module = SharedProjection(weight, bias)
            ensure_path(state[g], path).add_module(path.rsplit(".", 1)[-1], module)
            shared[g, path] = module

    bar = tqdm(
        total=sum(len(m) for _, m in plan.tie_groups()),
        desc="tying layers",
        unit="layer",
        disable=not progress or not plan.tie_groups(),
    )
    for g, members in plan.tie_groups():
        for i in members:
            block = layers[i]
            for path in projections:
                original = block.get_submodule(path)
                target = shared[g, path]
                rank = resolve_rank(plan.rank_for(path, family.kind_of(path)), tuple(linear_weight(original).shape))
                tied = TiedLinear(
                    target,
                    transposed=is_transposed(original),
                    bias=None if target.bias is not None else original.bias,
                    rank=rank,
                    dtype=original.weight.dtype,
                    device=original.weight.device,
                )
                if initialize and rank > 0:
                    lora_a, lora_b = relaxation(
                        linear_weight(original), target.weight, transposed=tied.transposed, rank=rank
                    )
                    with torch.no_grad():
                        tied.lora_A.copy_(lora_a)
                        tied.lora_B.copy_(lora_b)
                block.set_submodule(path, tied)
            bar.update()
    bar.close()
