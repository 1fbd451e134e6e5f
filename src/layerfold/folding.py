"""``fold(model, plan)``: drop blocks, tie the rest into groups, relax each tied layer."""

from __future__ import annotations

from torch import nn

from .calibrate import Statistics
from .errors import LayerfoldError
from .families import family_of
from .methods.basis import factorize_layers
from .methods.drop import drop_layers, merge_layers
from .methods.tie import tie_layers
from .modules import STATE_ATTRIBUTE, FoldState, fold_state
from .plan import FoldPlan


def fold(
    model: nn.Module, plan: FoldPlan, *, calibration: Statistics | None = None, progress: bool = True
) -> nn.Module:
    """Fold a Hugging Face model in place and return it.

    The shared weights start as the plan's ``init`` says; each tied layer's LoRA relaxation starts from the
    truncated SVD of its difference to the shared weight. ``rank="full"`` reproduces the original exactly.
    ``plan.factors`` are computed from the (whitened) SVD of the original weights; whitening needs
    ``calibration`` (see ``layerfold.calibrate``).
    """
    if fold_state(model) is not None:
        raise LayerfoldError("the model is already folded; fold the original model instead")
    plan.validate(model)
    apply_structure(
        model,
        plan,
        base_config=model.config.to_dict(),
        base_architecture=type(model).__name__,
        initialize=True,
        statistics=calibration,
        progress=progress,
    )
    from .io import install_save_hook  # io builds on this module

    install_save_hook(model)
    return model


def apply_structure(
    model: nn.Module,
    plan: FoldPlan,
    *,
    base_config: dict,
    base_architecture: str,
    initialize: bool,
    statistics: Statistics | None = None,
    progress: bool = False,
) -> FoldState:
    """Build a folded model's modules. ``fold`` fills them from the original; ``load`` from a checkpoint."""
    family = family_of(model)
    state = FoldState(plan, base_config, base_architecture)
    if initialize:
        merge_layers(family, model, plan.merges)
    tie_layers(model, family, plan, state, initialize=initialize, progress=progress)
    factorize_layers(model, family, plan, state, initialize=initialize, statistics=statistics, progress=progress)
    drop_layers(model, family, plan.kept_layers(), plan.num_layers)
    model.base_model.add_module(STATE_ATTRIBUTE, state)
    return state
