"""``fold(model, plan)``: drop blocks, tie the rest into groups, relax each tied layer."""

from __future__ import annotations

from torch import nn

from .calibrate import Statistics
from .errors import LayerfoldError
from .families import family_of
from .operations import Factor, Merge, Tie
from .operations.drop.build import drop_layers
from .operations.factor.build import factorize_layers
from .operations.merge.build import merge_layers
from .operations.tie.build import tie_layers
from .plan import FoldPlan
from .store import STATE_ATTRIBUTE, FoldState, fold_state


def fold(
    model: nn.Module, plan: FoldPlan, *, calibration: Statistics | None = None, progress: bool = True
) -> nn.Module:
    """Fold a Hugging Face model in place and return it.

    The shared weights start as the plan's ``init`` says; each tied layer's LoRA relaxation starts from the
    truncated SVD of its difference to the shared weight. ``rank="full"`` reproduces the original exactly.
    Factorisations are computed from the (whitened) SVD of the original weights; whitening needs
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
    keyed = plan.keyed()
    if initialize:
        merge_layers(model, family, [op for _, op in keyed if isinstance(op, Merge)])
    ties = [(key, op) for key, op in keyed if isinstance(op, Tie)]
    tie_layers(model, family, ties, state, initialize=initialize, progress=progress)
    factors = [(key, op) for key, op in keyed if isinstance(op, Factor)]
    factorize_layers(model, family, factors, state, initialize=initialize, statistics=statistics, progress=progress)
    drop_layers(model, family, plan.kept_layers(), plan.num_layers)
    model.base_model.add_module(STATE_ATTRIBUTE, state)
    return state
