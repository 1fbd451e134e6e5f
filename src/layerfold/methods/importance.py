"""How much each MLP channel and each attention head matters, for width pruning (``methods.prune``): one
registered score per name (``SCORES``), each measured on the original model and its calibration data.

A score is a function ``(model, calibration, units) -> {layer: tensor}``. ``units`` says what is scored in each
layer: the columns of one reading projection (down for MLP channels, o for heads), cut into ``size``-wide
pieces (1 for channels, the head size — or a key/value group's width — for heads). Every score is in units of
the reading projection's output energy or of the loss, so channels and heads of different layers compare.

- ``magnitude``: the squared weights that touch a unit (its producing rows and reading columns); no data.
- ``activation``: the output energy a unit contributes alone, ‖W[:, u] X_uᵀ‖² = tr(W_u G_uu W_uᵀ), from the
  Gram matrices calibration already gathers (Wanda's and SlimGPT's statistic, for whole units).
- ``fisher``: ``activation`` times the loss sensitivity of the reading projection's outputs (E‖∂L/∂y‖² per
  output unit, which calibration measures for causal LMs): an estimate of the loss change, so that units of
  different layers compare (later layers' outputs are larger and matter less per unit of energy). Encoders have
  no such loss here and get ``activation``.
- ``fluctuation``: FLAP's: the sample variance of each input column times the squared norm of its reading
  column, summed over the unit (what a unit's removal changes once its mean is compensated).
- ``taylor``: first-order Taylor estimate of the loss change when the unit is zeroed, |Σ ∂L/∂a · a| per batch
  (Molchanov et al.; Torch-Pruning's Taylor importance), with the LM loss (decoders) or the masked-token loss
  read through the input embeddings (encoders).
- ``self-supervised``: the same per sentence and in absolute value, with the model's own most likely tokens as
  labels (textpruner's self-supervised mode: no labels and no true next tokens needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine.calibrate import BlockWalk, Calibration
from ..core.errors import LayerfoldError, renamed
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of, linear_weight


@dataclass(frozen=True)
class Units:
    """What is scored in each listed layer: ``path``'s input columns in pieces of ``size``; ``producers`` are
    the projections whose rows a unit owns (for ``magnitude``), ``fused`` stacked copies each."""

    layers: tuple[int, ...]
    path: str
    size: int
    producers: tuple[str, ...]


Score = Callable[[nn.Module, Calibration, Units], dict[int, torch.Tensor]]
SCORES: dict[str, Score] = {}


def register_score(name: str) -> Callable[[Score], Score]:
    def add(score: Score) -> Score:
        SCORES[name] = score
        return score

    return add


def _pieces(values: torch.Tensor, size: int) -> torch.Tensor:
    """Sum a per-column vector over consecutive pieces of ``size``."""
    return values.reshape(-1, size).sum(-1)


@register_score("magnitude")
def magnitude(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    blocks = family_of(model).layer_list(model)
    scores = {}
    for i in units.layers:
        reading = linear_weight(blocks[i].get_submodule(units.path)).detach().double()
        columns = reading.square().sum(0)
        n = columns.numel()
        for path in units.producers:
            rows = linear_weight(blocks[i].get_submodule(path)).detach().double().square().sum(1)
            columns = columns + rows.reshape(-1, n).sum(0)  # fused (gate_up) rows fold onto their column
        scores[i] = _pieces(columns, units.size)
    return scores


@register_score("activation")
def activation(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    blocks = family_of(model).layer_list(model)
    statistics = calibration.statistics()
    scores = {}
    for i in units.layers:
        w = linear_weight(blocks[i].get_submodule(units.path)).detach().double()
        gram = statistics.gram(i, units.path)
        n, s = w.shape[1], units.size
        # tr(W_u G_uu W_uᵀ) for each piece u: the energy of that piece's part of the output on its own.
        blocks_of_gram = gram.reshape(n // s, s, n // s, s).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (u, s, s)
        pieces = w.reshape(w.shape[0], n // s, s).permute(1, 0, 2)  # (u, out, s)
        scores[i] = torch.einsum("uos,ust,uot->u", pieces, blocks_of_gram, pieces)
    return scores


@register_score("fisher")
def fisher(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    sensitivity = calibration.statistics().sensitivity
    return {i: score * sensitivity.get((i, units.path), 1.0) for i, score in activation(model, calibration, units).items()}


def input_moments(calibration: Calibration, paths: set[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """The mean of each listed projection's input columns over the calibration tokens (one walk through the
    model, kept on the calibration)."""
    cache = calibration.derived.setdefault("input_means", {})
    missing = sorted(paths - set(cache))
    if missing:
        model = calibration.model
        walk = BlockWalk(model, calibration.batches)
        sums: dict[tuple[int, str], torch.Tensor] = {}
        last = max(i for i, _ in missing)
        for i in tqdm(range(last + 1), desc="input means", unit="block", disable=not calibration.progress):
            wanted = sorted({p for j, p in missing if j == i})

            def record(name, batch, rows, i=i):
                total = rows.double().sum(0)
                sums[i, name] = sums[i, name] + total if (i, name) in sums else total

            walk.measure(i, wanted, on_input=record)
        for key, total in sums.items():
            cache[key] = total / walk.tokens
    return {key: cache[key] for key in paths}


@register_score("fluctuation")
def fluctuation(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    blocks = family_of(model).layer_list(model)
    statistics = calibration.statistics()
    means = input_moments(calibration, {(i, units.path) for i in units.layers})
    scores = {}
    for i in units.layers:
        w = linear_weight(blocks[i].get_submodule(units.path)).detach().double()
        mean = means[i, units.path]
        variance = (statistics.gram(i, units.path).diagonal() / statistics.tokens - mean.square()).clamp_min(0)
        scores[i] = _pieces(w.square().sum(0) * variance, units.size)
    return scores


def _loss(model: nn.Module, batch: dict, embedded: torch.Tensor, chosen: torch.Tensor | None, own_labels: bool):
    """The loss whose gradient ranks units: the next-token LM loss (decoders), or the loss of the ``chosen``
    (masked) tokens read out through the input embeddings (encoders); ``own_labels`` takes the model's own most
    likely tokens as the labels."""
    mask = batch["attention_mask"]
    if chosen is None:
        logits = model(inputs_embeds=embedded, attention_mask=mask, use_cache=False).logits.float()[:, :-1]
        labels = logits.detach().argmax(-1) if own_labels else batch["input_ids"][:, 1:]
        labels = labels.masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    hidden = model(inputs_embeds=embedded, attention_mask=mask).last_hidden_state
    logits = (hidden[chosen] @ model.get_input_embeddings().weight.T).float()
    labels = logits.detach().argmax(-1) if own_labels else batch["input_ids"][chosen]
    return F.cross_entropy(logits, labels, reduction="sum")


def _taylor(model: nn.Module, calibration: Calibration, units: Units, *, per_sentence: bool) -> dict[int, torch.Tensor]:
    blocks = family_of(model).layer_list(model)
    scores: dict[int, torch.Tensor] = {}
    state: dict[str, int] = {}

    def hook(i):
        def pre(module, args):
            x = args[0]
            if not x.requires_grad:
                return

            def record(grad, x=x.detach()):
                product = grad.double() * x.double()  # (batch, tokens, columns); padding has no gradient
                product = product.reshape(state["batch"], -1, product.shape[-1])  # OPT flattens the tokens
                pieces = product.reshape(*product.shape[:-1], -1, units.size).sum(-1).sum(-2)  # (batch, units)
                value = pieces.abs().sum(0) if per_sentence else pieces.sum(0).abs()
                scores[i] = scores[i] + value if i in scores else value

            x.register_hook(record)

        return pre

    causal = is_causal_lm(model)
    few = [
        {key: value[:, : calibration.sensitivity_length] for key, value in batch.items()}
        for batch in calibration.batches[: max(calibration.sensitivity_batches, 8)]
    ]
    handles = [blocks[i].get_submodule(units.path).register_forward_pre_hook(hook(i)) for i in units.layers]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    embeddings = model.get_input_embeddings()
    try:
        for batch in tqdm(few, desc=f"{'self-supervised' if per_sentence else 'taylor'} importance", unit="batch",
                          disable=not calibration.progress):  # fmt: skip
            ids, chosen = batch["input_ids"], None
            state["batch"] = ids.shape[0]
            if not causal:  # 15 % of the tokens masked (as the analysis's encoder loss does)
                chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & batch["attention_mask"].bool()
                chosen = chosen if chosen.any() else batch["attention_mask"].bool()
                if calibration.mask_token_id is not None:
                    ids = ids.masked_fill(chosen, calibration.mask_token_id)
            with torch.enable_grad():
                embedded = embeddings(ids).detach().requires_grad_(True)
                loss = _loss(model, batch, embedded, chosen, per_sentence)
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    if len(scores) != len(units.layers):
        raise LayerfoldError("taylor importance: the loss did not reach every pruned projection")
    return scores


@register_score("taylor")
def taylor(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    return _taylor(model, calibration, units, per_sentence=False)


@register_score("self-supervised")
def self_supervised(model: nn.Module, calibration: Calibration, units: Units) -> dict[int, torch.Tensor]:
    return _taylor(model, calibration, units, per_sentence=True)


register = renamed(register_score, "layerfold.methods.importance.register")  # the old name, kept working
