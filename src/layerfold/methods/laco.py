"""LaCo (Yang et al., 2024): collapse runs of adjacent blocks into one, from the top of the stack down.

A merge of layers l..l+C-1 keeps layer l with θ*_l = θ_l + Σ_k (θ_{l+k} − θ_l) (Reserving Differences while
Seeking Common) and removes the others. It is kept only if the model's last hidden states on a few
calibration samples stay above a cosine ``threshold`` against the original's; otherwise the next lower
layer is tried. After a kept merge the search moves ``interval`` layers down. It stops when the budget is
met. The result is a plan with ``merges`` and ``drop``, which ``fold`` applies to the original weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.budget import Budget
from ..engine.calibrate import restricted_stack
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of
from ..operations import Drop, Merge
from ..operations.merge.build import merge_blocks
from ..operations.plan import FoldPlan
from .registry import Candidate, Method, register_method
from .shortgpt import block_parameters


def _last_hidden(model: nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    base = model.base_model
    extra = {"use_cache": False} if is_causal_lm(model) else {}
    outputs = []
    for batch in batches:
        hidden = base(**batch, **extra).last_hidden_state
        outputs.append(hidden[batch["attention_mask"].bool()].float())
    return outputs


def _similarity(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    cosines = torch.cat([F.cosine_similarity(r, c, dim=-1) for r, c in zip(reference, candidate)])
    return float(cosines.mean())


@torch.no_grad()
def laco_plan(
    model: nn.Module,
    batches: Sequence[dict],
    budget: Budget,
    *,
    merge: int = 3,
    interval: int = 2,
    threshold: float = 0.65,
    lowest: int = 1,
    progress: bool = False,
) -> FoldPlan:
    """Search merges on the (unchanged) original model and return the plan; see the module docstring."""
    if merge < 2:
        raise LayerfoldError(f"--merge must be at least 2 (layers collapsed into one), got {merge}")
    if interval < 1:
        raise LayerfoldError(f"--interval must be at least 1, got {interval}")
    family = family_of(model)
    layers = family.layer_list(model)
    num_layers = len(layers)
    sizes = block_parameters(model)
    reduction = budget.reduction(model)
    if sum(sorted(sizes)[1:]) < reduction:
        raise budget.unreachable(model, sum(sorted(sizes)[1:]), "laco (merging all blocks into one)")
    model.eval()
    reference = _last_hidden(model, batches)

    alive = list(range(num_layers))  # original indices of the current stack
    blocks = {i: layers[i] for i in alive}  # current (possibly merged) block per original index
    merges: list[dict] = []
    removed = 0
    position = num_layers - merge
    bar = tqdm(total=reduction, desc="laco merges", unit="param", disable=not progress)
    while position >= lowest and removed < reduction and len(alive) > 1:
        run = alive[position : position + merge]
        for length in range(2, len(run) + 1):  # no more layers than the budget still needs
            if removed + sum(sizes[i] for i in run[1:length]) >= reduction:
                run = run[:length]
                break
        if len(run) < 2:
            position -= 1
            continue
        into, sources = run[0], run[1:]
        run_removed = sum(sizes[i] for i in sources)
        merged = copy.deepcopy(blocks[into])
        merge_blocks(merged, [blocks[i] for i in sources])
        candidate = [i for i in alive if i not in sources]
        with restricted_stack(model, candidate, [merged if i == into else blocks[i] for i in candidate]):
            similarity = _similarity(reference, _last_hidden(model, batches))
        if similarity > threshold:
            blocks[into] = merged
            alive = candidate
            merges.append({"into": into, "layers": sources, "similarity": round(similarity, 4)})
            removed += run_removed
            bar.update(run_removed)
            position = min(position - interval, len(alive) - merge)
        else:
            position -= 1
    bar.close()
    if removed < reduction:
        raise LayerfoldError(
            f"laco could not meet {budget.option} {budget.keep:g}: every further merge drops the similarity of "
            f"the last hidden states below the threshold {threshold:g} (lower --threshold, or keep more)"
        )
    return FoldPlan(
        num_layers=num_layers,
        operations=[Merge(into=m["into"], layers=m["layers"]) for m in merges]
        + ([Drop(layers=sorted(set(range(num_layers)) - set(alive)))] if len(alive) < num_layers else []),
        provenance={
            "method": "laco",
            "keep": budget.keep,
            "blocks_only": budget.blocks_only,
            "merge": merge,
            "interval": interval,
            "threshold": threshold,
            "similarities": [m["similarity"] for m in merges],
            "samples": len(batches),
        },
    )


@dataclass
class LacoOptions:
    """Options of LaCo.

    samples: calibration samples whose last hidden states a merge is checked on (the first batches, cut to 512
        tokens).
    merge: layers collapsed into one by a merge.
    interval: layers the search moves down after a kept merge.
    threshold: cosine similarity of the last hidden states that a merge must keep (the paper: 0.65).
    """

    samples: int = 4
    merge: int = 3
    interval: int = 2
    threshold: float = 0.65


def few_shot(calibration, samples: int, length: int = 512) -> list[dict]:
    """LaCo compares last hidden states on a few samples: the first calibration batches, cut to ``length``."""
    return [{key: value[:, :length] for key, value in batch.items()} for batch in calibration.batches[:samples]]


def _plan(model, budget, calibration, options: LacoOptions) -> FoldPlan:
    return laco_plan(
        model,
        few_shot(calibration, options.samples),
        budget,
        merge=options.merge,
        interval=options.interval,
        threshold=options.threshold,
    )


METHOD = register_method(
    Method(
        "laco",
        "LaCo: collapse adjacent blocks into one (θ_l + Σ(θ_k − θ_l)) while the last hidden state stays similar",
        _plan,
        LacoOptions,
        # The paper's check (0.65) rejects every 3-layer merge of these small models (SmolLM2: similarities
        # 0.04-0.46), so the sweep also runs the merges unchecked; a user sets --threshold.
        lambda quick: [{"merge": 3, "threshold": 0.0}],
        calibrated=True,
        candidates=lambda analysis: [Candidate("drop: LaCo merges of 3", "drop", {"merge": 3, "threshold": 0.0})],
    )
)
