"""What a heal run is set to: the loss weights, the run's settings, and the names of its files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..core.errors import LayerfoldError
from ..checkpoints.output_guard import HEAL_SETTINGS_NAME
from ..core.settings import parse_list, setting
from .losses import LOSSES

TRAIN_CHOICES = ("relax", "relax+shared", "all")
STAGES = ("blockwise", "e2e", "both")
CHECKPOINT_PREFIX = "checkpoint-"
SETTINGS_NAME = HEAL_SETTINGS_NAME
LOSS_NAMES = tuple(LOSSES)  # the losses registered with layerfold itself
REPORT_JSON = "heal.json"
REPORT_MD = "heal.md"


# ---- settings ---------------------------------------------------------------------------------------------
class LossWeights:
    """Weights of the registered distillation losses (``heal.losses.LOSSES``: kl, lm, hidden, cosine, ...) by
    name, e.g. ``LossWeights(kl=1, hidden=0.5)``; a zero weight turns a loss off. Read as attributes
    (``weights.kl``); ``to_dict`` gives every registered loss's weight."""

    def __init__(self, **weights: float) -> None:
        unknown = sorted(set(weights) - set(LOSSES))
        if unknown:
            raise LayerfoldError(f"--loss: unknown loss '{unknown[0]}' (choose from {', '.join(LOSSES)})")
        self._weights = {name: float(weights.get(name, 0.0)) for name in LOSSES}

    def __getattr__(self, name: str) -> float:
        weights = self.__dict__.get("_weights", {})
        if name in weights:
            return weights[name]
        raise AttributeError(f"no loss {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LossWeights) and self._weights == other._weights

    def __repr__(self) -> str:
        return f"LossWeights({', '.join(f'{k}={v:g}' for k, v in self.active().items())})"

    @classmethod
    def default(cls, causal: bool) -> "LossWeights":
        """Chosen on development data (benchmarks/loss_mix.py): for MiniLM cosine + hidden was best on STS-B dev
        and on off-domain text; for SmolLM2 adding lm=0.5 to kl lowered WikiText dev perplexity by 5 % but raised
        Tiny Shakespeare dev by 8 % (the lm term fits the heal domain), so decoders keep kl alone."""
        return cls(kl=1.0) if causal else cls(cosine=1.0, hidden=1.0)

    @classmethod
    def parse(cls, text: str) -> "LossWeights":
        """``kl=1,hidden=0.5``; a bare name means weight 1."""
        weights: dict[str, float] = {}
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            if not name:
                continue
            if name not in LOSSES:
                raise LayerfoldError(f"--loss: unknown loss '{name}' (choose from {', '.join(LOSSES)})")
            try:
                weight = float(value) if sep else 1.0
            except ValueError:
                raise LayerfoldError(f"--loss: weight of {name} must be a number, got '{value}'") from None
            if weight < 0 or not math.isfinite(weight):
                raise LayerfoldError(f"--loss: weight of {name} must be a finite number ≥ 0, got {value}")
            weights[name] = weight
        if not any(weights.values()):
            raise LayerfoldError(f"--loss: no loss has a positive weight in '{text}'")
        return cls(**weights)

    def active(self) -> dict[str, float]:
        return {n: w for n, w in self._weights.items() if w > 0}

    def to_dict(self) -> dict[str, float]:
        return dict(self._weights)

    def check(self, causal: bool, teacher_cache: bool) -> None:
        """The active losses suit the model, and the teacher cache holds all they read of the teacher."""
        kind = "decoders" if causal else "encoders"
        unsuited = [n for n in self.active() if not LOSSES[n].suits(causal)]
        if unsuited:
            others = "/".join(n for n, loss in LOSSES.items() if loss.suits(causal))
            only = sorted({LOSSES[n].models for n in unsuited})[0]
            raise LayerfoldError(f"the {' and '.join(unsuited)} loss{'es' if len(unsuited) > 1 else ''} "
                                 f"{'are' if len(unsuited) > 1 else 'is'} for {only} only"
                                 f"{' (causal language models)' if only == 'decoders' else ''}; {kind} heal with {others}")  # fmt: skip
        if teacher_cache:
            cached = [n for n, loss in LOSSES.items() if loss.in_teacher_cache]
            active = self.active()
            if not any(n in cached for n in active) or any(LOSSES[n].reads_teacher and n not in cached for n in active):
                raise LayerfoldError(f"--teacher-cache holds the teacher's top-k logits: use it with the "
                                     f"{'/'.join(cached)} loss only")  # fmt: skip


def _loss_help() -> str:
    names = ", ".join(f"{name} ({loss.models})" for name, loss in LOSSES.items())
    return f"Loss weights, e.g. kl=1,hidden=0.5; the registered losses: {names}."


def _unit_memory(text: str) -> int:
    from ..core.tensor_files import parse_size

    return parse_size(text, "--unit-memory")


def _layers(text: str) -> list[int]:
    return parse_list(int, "--hidden-layers")(text) or [-1]


@dataclass(kw_only=True)
class HealConfig:
    """How to heal. ``None`` fields take a default that depends on the model kind (decoder or encoder); each field
    is a ``layerfold heal`` option (``jobs.settings.setting``)."""

    steps: int = setting(200, help="Optimizer steps.")
    lr: float = setting(1e-4, help="Peak learning rate (cosine schedule, warm-up --warmup).")
    batch: int = setting(8, help="Examples per step and device.")
    seq_len: int | None = setting(help="Tokens per example.", default_text="512-token windows for decoders, 128 for encoders")
    grad_accum: int = setting(1, help="Gradient accumulation steps.")
    warmup: float = setting(0.05, help="Warm-up, a fraction of the steps.")
    weight_decay: float = setting(0.0, help="AdamW weight decay.")
    loss: LossWeights | None = setting(help=_loss_help, parse=lambda text: LossWeights.parse(text),
                                       default_text="kl for decoders; cosine=1,hidden=1 for encoders")  # fmt: skip
    temperature: float = setting(1.0, help="Temperature of the kl loss.")
    hidden_layers: list[int] = setting(factory=lambda: [-1], parse=_layers,
                                       help="Layers for the hidden loss, e.g. -1,-2,-3 (negative: from the end).")  # fmt: skip
    train: str = setting("all", help="What trains.", choices=TRAIN_CHOICES)
    norms: bool | None = setting(help="Train the norm weights.", negatable=True, default_text="with --train all only")
    eval_every: int | None = setting(help="Held-out fidelity every N steps.", default_text="steps / 10")
    eval_examples: int | None = setting(help="Held-out windows or sentences.", default_text="8 windows; 256 sentences")
    save_every: int | None = setting(help="Checkpoint every N steps.", default_text="steps / 4")
    log_every: int | None = setting(help="Log the losses every N steps.", default_text="steps / 20")
    seed: int = setting(0, help="Random seed (data order, held-out split, initialisation).")
    teacher_cache: str | None = setting(help="Folder for the teacher's top-k logits, reused by later runs (kl loss only).")
    top_k: int = setting(64, help="Logits per token kept in --teacher-cache.")
    max_examples: int | None = setting(help="Use at most N training examples.")
    # Block-wise stage (``blockwise.py``): steps per unit, its own learning rate, the training tokens it uses
    # (the first of the training examples), examples per step, and the memory bound of one unit.
    stage: str = setting("both", choices=STAGES, help="blockwise: train each folded unit to reproduce the "
                         "original's outputs on cached inputs; e2e: distillation through the whole model; both: "
                         "block-wise first.")  # fmt: skip
    block_steps: int = setting(100, help="Block-wise steps per unit.")
    block_lr: float = setting(1e-3, help="Block-wise peak learning rate.")
    block_tokens: int = setting(32768, help="Training tokens the block-wise stage uses.")
    block_batch: int | None = setting(help="Block-wise examples per step.", default_text="4 windows; 32 sentences")
    unit_memory: int = setting(2 * 10**9, parse=_unit_memory, default_text="2GB",
                               help="Memory bound of one block-wise unit (weights, gradients, optimizer state).")  # fmt: skip
    block_kl: float = setting(0.0, help="Decoders: weight of a KL term through the head for the unit with the last "
                              "layer.")  # fmt: skip
    shared_lr: float | None = setting(help="End-to-end learning rate of the shared tensors.", default_text="--lr")

    def resolved(self, causal: bool) -> "HealConfig":
        """A copy with every default filled in for this model kind, after checking the values."""
        for name in ("steps", "batch", "grad_accum", "top_k"):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LayerfoldError(f"--lr must be a positive number, got {self.lr}")
        if self.temperature <= 0:
            raise LayerfoldError(f"--temperature must be positive, got {self.temperature}")
        if self.stage not in STAGES:
            raise LayerfoldError(f"--stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        for name in ("block_steps", "block_tokens", "unit_memory"):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.block_batch is not None and self.block_batch < 1:
            raise LayerfoldError(f"--block-batch must be at least 1, got {self.block_batch}")
        for name in ("block_lr", "shared_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise LayerfoldError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if not (self.block_kl >= 0 and math.isfinite(self.block_kl)):
            raise LayerfoldError(f"--block-kl must be a number of at least 0, got {self.block_kl}")
        if self.block_kl and not causal:
            raise LayerfoldError("--block-kl reads the next-token distribution: it needs a causal language model")
        if self.train not in TRAIN_CHOICES:
            raise LayerfoldError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got '{self.train}'")
        loss = self.loss or LossWeights.default(causal)
        loss.check(causal, bool(self.teacher_cache))
        seq_len = self.seq_len or (512 if causal else 128)
        if seq_len < 2:
            raise LayerfoldError(f"--seq-len must be at least 2, got {seq_len}")
        return HealConfig(
            **{
                **asdict(self),
                "loss": loss,
                "seq_len": seq_len,
                "norms": self.train == "all" if self.norms is None else self.norms,
                "eval_every": self.eval_every or max(1, self.steps // 10),
                "eval_examples": self.eval_examples or (8 if causal else 256),
                "save_every": self.save_every or max(1, self.steps // 4),
                "log_every": self.log_every or max(1, self.steps // 20),
                "block_batch": self.block_batch or (4 if causal else 32),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: self.loss.to_dict() if f.name == "loss" and self.loss else getattr(self, f.name) for f in fields(self)
        }
