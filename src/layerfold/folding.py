"""``fold(model, plan)``: fold a Hugging Face model in memory with the engine (``layerfold.engine``)."""

from __future__ import annotations

from torch import nn

from .calibrate import Statistics
from .engine import fold_in_memory
from .errors import LayerfoldError
from .io import install_save_hook
from .plan import FoldPlan
from .store import fold_state


def fold(
    model: nn.Module, plan: FoldPlan, *, calibration: Statistics | None = None, progress: bool = True
) -> nn.Module:
    """Fold a Hugging Face model in place and return it.

    A tie's shared weights start as the mean of its ``sources``; each tied layer's LoRA relaxation starts from
    the truncated SVD of its difference to the shared weight (``rank="full"`` reproduces the original exactly).
    Factorisations are computed from the (whitened) SVD of the original weights; whitening needs
    ``calibration`` (see ``layerfold.calibrate``).
    """
    if fold_state(model) is not None:
        raise LayerfoldError("the model is already folded; fold the original model instead")
    plan.validate(model)
    fold_in_memory(
        model,
        plan,
        base_config=model.config.to_dict(),
        base_architecture=type(model).__name__,
        statistics=calibration,
        progress=progress,
    )
    install_save_hook(model)
    return model
