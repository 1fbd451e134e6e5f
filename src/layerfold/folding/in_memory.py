"""``fold(model, plan)``: fold a Hugging Face model in memory with the engine (``layerfold.engine.execute``)."""

from __future__ import annotations

import copy

from torch import nn

from ..engine.calibrate import Statistics
from ..engine.execute import fold_in_memory
from ..core.errors import LayerfoldError
from ..checkpoints.folded import install_save_hook
from ..operations.plan import FoldPlan
from ..engine.sequential import refit
from ..core.store import fold_state


def fold(
    model: nn.Module,
    plan: FoldPlan,
    *,
    calibration: Statistics | None = None,
    progress: bool = True,
    sequential: bool = False,
) -> nn.Module:
    """Fold a Hugging Face model in place and return it.

    A tie's shared weights are fitted to its ``sources`` (their mean, or least squares on their calibration
    inputs); each tied layer's LoRA relaxation starts from the truncated (optionally whitened) SVD of its
    difference to the shared weight (``rank="full"`` reproduces the original exactly). Factorisations are
    computed from the (whitened) SVD of the original weights. What fits to data needs ``calibration`` (see
    ``layerfold.engine.calibrate``). ``sequential`` (off by default: on development data it lowered every row tried,
    see the README's "Fitting to data"): then refit those steps on the inputs the folded layers before them
    produce (``layerfold.engine.sequential``); the plan's provenance records it.
    """
    if fold_state(model) is not None:
        raise LayerfoldError("the model is already folded; fold the original model instead")
    plan.validate(model)
    # A plan that fits nothing to data has nothing to refit (and without calibration the engine says so).
    sequential = bool(sequential and plan.whitens() and calibration is not None)
    if sequential and calibration.batches is None:
        raise LayerfoldError("--sequential walks the calibration batches again: give statistics that hold them")
    if plan.whitens():
        plan.provenance = {**plan.provenance, "sequential": sequential}
    original = copy.deepcopy(model) if sequential else None  # the walk needs the original's hidden states
    fold_in_memory(
        model,
        plan,
        base_config=model.config.to_dict(),
        base_architecture=type(model).__name__,
        statistics=calibration,
        progress=progress,
        then=(lambda units, originals, targets: refit(original, model, plan, units, originals, calibration, targets,
                                                      progress=progress)) if sequential else None,
    )  # fmt: skip
    install_save_hook(model)
    return model
