"""What trains (``--train``): a folded model's per-layer relaxations, its shared weights, or all."""

from __future__ import annotations

from torch import nn

from ..core.errors import LayerfoldError
from ..operations.base import FoldedProjection
from ..core.store import fold_state


def select_trainable(model: nn.Module, train: str, norms: bool) -> dict[str, int]:
    """Set ``requires_grad`` by the ``--train`` choice and return parameter counts by role.

    relax: each layer's own relaxation, whatever its form (a tied projection's LoRA factors, or its form's trainable
    tensors and pool: VeRA's vectors, SVFit's singular values, a MoS pool and factors; a factorised projection's
    coefficients); relax+shared: also the shared weights and bases; all: every parameter. ``norms`` adds the
    normalisation weights to the first two and, when false, keeps them frozen under ``all``."""
    relax, shared, norm = set(), set(), set()
    for module in model.modules():
        if isinstance(module, FoldedProjection):
            relax.update(id(p) for p in module.relaxation_parameters())
        elif "norm" in type(module).__name__.lower():
            norm.update(id(p) for p in module.parameters(recurse=False))
    state = fold_state(model)
    if state is not None:
        shared.update(id(p) for p in state.parameters())
    chosen = {"relax": relax, "relax+shared": relax | shared}.get(train)
    counts = {"relax": 0, "shared": 0, "norms": 0, "other": 0, "trainable": 0, "total": 0}
    for param in model.parameters():
        pid = id(param)
        trains = (pid in chosen or (norms and pid in norm)) if chosen is not None else (norms or pid not in norm)
        trains = trains and param.is_floating_point()  # MoS's index maps are parameters too, and never train
        param.requires_grad_(trains)
        role = "relax" if pid in relax else "shared" if pid in shared else "norms" if pid in norm else "other"
        counts[role] += param.numel()
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if trains else 0
    if counts["trainable"] == 0:
        what = {"relax": "per-layer relaxations", "relax+shared": "relaxations or shared weights"}.get(train, "")
        raise LayerfoldError(f"nothing to train with --train {train}: the folded model has no {what} (use --train all)")
    return counts
