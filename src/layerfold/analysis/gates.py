"""FoldGPT's block gates: a trainable scalar per block scales its residual update (h + g·f(h)); the gates are
trained briefly with HF Trainer to keep the final hidden states while an L1 penalty pulls them to zero, so a block
the others can stand in for ends with a small gate (a ranking that sees coupling between blocks). One of the
analysis's measures (``analysis.analyze``)."""

from __future__ import annotations

import tempfile
from typing import Sequence

import torch
from torch import nn

from ..engine.calibrate import _first
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of


class GatedStack(nn.Module):
    """The model with a trainable scalar gate on each block's residual update; the model's own weights stay
    frozen. ``forward`` returns the final hidden states (after the final norm where the model has one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        layers = family_of(model).layer_list(model)
        self.gates = nn.Parameter(torch.ones(len(layers)))
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._remember(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._gate(i)))

    def _remember(self, index: int):
        def hook(module, args, kwargs):
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _gate(self, index: int):
        def hook(module, args, output):
            hidden_in = self._inputs.pop(index)
            hidden_out = _first(output)
            gated = hidden_in + self.gates[index].to(hidden_out.dtype) * (hidden_out - hidden_in)
            return (gated, *output[1:]) if isinstance(output, (tuple, list)) else gated

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if is_causal_lm(self.model) else {}
        return self.model.base_model(**batch, **kwargs).last_hidden_state


class _Batches(torch.utils.data.Dataset):
    """Pre-made batches, each with its reference final hidden states; the loader hands them out whole."""

    def __init__(self, batches: Sequence[dict], targets: Sequence[torch.Tensor]) -> None:
        self.items = [{**batch, "target": target} for batch, target in zip(batches, targets)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _whole_batch(items: list[dict]) -> dict:
    return items[0]


def train_gates(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    steps: int = 40,
    lr: float = 0.05,
    sparsity: float = 0.05,
    progress: bool = True,
) -> list[float]:
    """FoldGPT's block gates: train one scalar per block (model frozen) to keep the final hidden states
    (relative squared error) under an L1 penalty of weight ``sparsity``; returns the gates."""
    from transformers import Trainer, TrainingArguments

    from ..core.progress import show_progress

    if steps < 1:
        raise LayerfoldError(f"gate steps must be at least 1, got {steps}")
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        targets = [
            model.base_model(**b, **({"use_cache": False} if is_causal_lm(model) else {})).last_hidden_state
            for b in batches
        ]
    gated = GatedStack(model)

    class GateTrainer(Trainer):
        def compute_loss(self, wrapped, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            target = inputs.pop("target")
            mask = inputs["attention_mask"].bool()
            hidden = wrapped(**inputs)
            error = (hidden[mask] - target[mask]).float().square().sum() / target[mask].float().square().sum()
            return error + sparsity * wrapped.gates.abs().mean()

    try:
        with tempfile.TemporaryDirectory(prefix="layerfold-gates-") as scratch:
            args = TrainingArguments(
                output_dir=scratch,
                max_steps=steps,
                per_device_train_batch_size=1,
                learning_rate=lr,
                lr_scheduler_type="constant",
                warmup_steps=0,
                weight_decay=0.0,
                save_strategy="no",
                logging_strategy="no",
                report_to=[],
                remove_unused_columns=False,
                disable_tqdm=not progress,
                use_cpu=not torch.cuda.is_available(),
                dataloader_drop_last=False,
                seed=0,
            )
            trainer = GateTrainer(
                model=gated, args=args, train_dataset=_Batches(batches, targets), data_collator=_whole_batch
            )
            show_progress(trainer, "block gates", progress=progress)
            trainer.train()
        return [float(g) for g in gated.gates.detach()]
    finally:
        gated.remove()
        model.eval()  # Trainer left it in training mode (dropout on); it was measured, not trained
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
