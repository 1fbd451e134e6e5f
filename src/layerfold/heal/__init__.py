"""Healing: recover a folded model by distillation from its original, on Hugging Face ``Trainer``.

The student is a folded checkpoint, the teacher the original model. ``Trainer`` runs the loop and hands
distribution to accelerate, so ``accelerate launch -m layerfold heal ...`` runs the same command with DDP (or
FSDP) on many devices. What layerfold adds: the distillation losses (``losses``), the choice of what trains
(``trainable``), data packing (``data``), a held-out fidelity check every N steps (``trainer``), an optional
on-disk cache of the teacher's top-k logits (``teacher_cache``), and checkpoints that are themselves layerfold
checkpoints, so a run killed at any moment resumes from the last complete one (``checkpoints``). ``job`` is
the command; ``settings`` what it is set to.

Shared weights and FSDP: every shared tensor (a tie group's projection, a shared basis) lives once, in the
``layerfold_shared`` module at the base model's root, and the layers only point at it. Wrapping each
transformer block in its own FSDP unit (``fsdp_transformer_layer_cls_to_wrap``) therefore leaves all shared
tensors in the root unit, so a tied weight is never split across units. Use ``use_orig_params=True`` when only
part of the model trains (``--train relax``).
"""

from __future__ import annotations

import sys
import types

from ..core.texts import read_documents
from .data import HealData, prepare_data
from .job import HealReport, check_teacher, heal
from .streamed import StreamedHealReport, heal_streamed
from .losses import distillation_losses, logits_from_hidden, teacher_layer_map, token_losses
from .settings import LOSS_NAMES, REPORT_JSON, REPORT_MD, SETTINGS_NAME, TRAIN_CHOICES, HealConfig, LossWeights
from .trainable import select_trainable

__all__ = [
    "LOSS_NAMES",
    "REPORT_JSON",
    "REPORT_MD",
    "SETTINGS_NAME",
    "TRAIN_CHOICES",
    "HealConfig",
    "HealData",
    "LossWeights",
    "check_teacher",
    "distillation_losses",
    "heal",
    "heal_streamed",
    "StreamedHealReport",
    "HealReport",
    "logits_from_hidden",
    "prepare_data",
    "read_documents",
    "select_trainable",
    "teacher_layer_map",
    "token_losses",
]


class _HealModule(types.ModuleType):
    """``layerfold.heal(folded, teacher, data, out, config)`` runs the heal job; ``layerfold.heal`` is also this
    package (``from layerfold.heal import HealConfig``), so the package is callable."""

    def __call__(self, *args, **kwargs):
        return heal(*args, **kwargs)


sys.modules[__name__].__class__ = _HealModule
