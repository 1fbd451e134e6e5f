"""Building ``tie`` operations in a model: the layers of a group share one weight per projection (held once,
in the store under the operation's key); each keeps its own bias, norms and relaxation."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ...families import Family, is_transposed, linear_weight
from ...store import FoldState, ensure_path
from .modules import SharedProjection, TiedLinear
from .relax import lora_from_delta, resolve_rank
from .spec import Tie


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
    model: nn.Module, family: Family, ties: list[tuple[str, Tie]], state: FoldState, *, initialize: bool, progress: bool
) -> None:
    """Replace the shared projections of every ``tie`` operation (with its store key) by TiedLinear modules.

    With ``initialize=False`` only the structure is built (empty tensors, e.g. on the meta device) for a
    checkpoint's weights to be loaded into.
    """
    layers = family.layer_list(model)
    # All shared weights first: a group's sources may be layers that another group ties later.
    shared: dict[tuple[str, str], SharedProjection] = {}
    for key, op in ties:
        entry = nn.Module()
        for path in family.shared_projections(op.share):
            template = layers[op.layers[0]].get_submodule(path)
            originals = [layers[i].get_submodule(path) for i in op.sources]
            share_bias = op.share_bias and template.bias is not None
            if initialize:
                weight = average([m.weight for m in originals])
                bias = average([m.bias for m in originals]) if share_bias else None
            else:
                weight = torch.empty_like(template.weight)
                bias = torch.empty_like(template.bias) if share_bias else None
            module = SharedProjection(weight, bias)
            ensure_path(entry, path).add_module(path.rsplit(".", 1)[-1], module)
            shared[key, path] = module
        state[key] = entry

    bar = tqdm(
        total=sum(len(op.layers) for _, op in ties), desc="tying layers", unit="layer", disable=not progress or not ties
    )
    for key, op in ties:
        for i in op.layers:
            block = layers[i]
            for path in family.shared_projections(op.share):
                original = block.get_submodule(path)
                target = shared[key, path]
                rank = resolve_rank(op.rank_for(path, family.kind_of(path)), tuple(linear_weight(original).shape))
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
