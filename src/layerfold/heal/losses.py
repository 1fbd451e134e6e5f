"""The distillation losses, one registered ``Loss`` each (``LOSSES``): what it measures, which models it suits,
what it reads of the teacher, and its computation. ``LossWeights``, ``--loss``, the settings' checks and the
trainer read the registry, so a new loss is one ``register_loss(Loss(...))`` here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import LayerfoldError, Registry
from ..evaluation.metrics import mean_pool
from ..core.families import family_of

if TYPE_CHECKING:
    from .settings import LossWeights


@dataclass(frozen=True)
class Loss:
    """One distillation loss. ``compute(student_out, teacher_out, batch, context)`` returns its unweighted value
    for a batch (``context``: ``LossContext``); ``None`` marks a token loss (kl, lm), which ``token_losses``
    computes with the others a chunk of tokens at a time, so that no (tokens x vocabulary) tensor is built whole.
    ``models``: "decoders", "encoders" or "both"; ``reads_teacher``: it needs the teacher's forward pass, unless
    ``in_teacher_cache`` (what it reads, the teacher's top-k logits, is in ``--teacher-cache``)."""

    name: str
    summary: str
    models: str = "both"
    reads_teacher: bool = True
    in_teacher_cache: bool = False
    compute: Callable[..., torch.Tensor] | None = None

    def suits(self, causal: bool) -> bool:
        return self.models == "both" or self.models == ("decoders" if causal else "encoders")


@dataclass
class LossContext:
    """What a loss may read besides the two outputs and the batch."""

    hidden_pairs: list[tuple[int, int]]
    student_head: Any = None
    teacher_head: Any = None
    temperature: float = 1.0
    cached: tuple[torch.Tensor, torch.Tensor] | None = None


LOSSES: Registry = Registry("loss")
register_loss = LOSSES.add


def teacher_layer_map(plan) -> list[int]:
    """For each layer of the folded model, the original layer whose output it stands in for: itself, or after
    a LaCo merge the last layer it absorbed."""
    reach = list(range(plan.num_layers))
    for merge in plan.merges():
        reach[merge.into] = max([reach[merge.into]] + [reach[k] for k in merge.layers])
    return [reach[layer] for layer in plan.kept_layers()]


def hidden_layer_pairs(config, mapping: list[int]) -> list[tuple[int, int]]:
    """(student, teacher) indices into ``hidden_states`` for the hidden-state loss at ``config.hidden_layers``;
    ``mapping``: for each folded layer, the original layer it stands in for (``teacher_layer_map``)."""
    layers = len(mapping)
    positions = sorted({p % layers for p in config.hidden_layers}) if config.loss.hidden else []
    # hidden_states[i + 1] is the output of layer i (hidden_states[0] is the embeddings).
    pairs = [(p + 1, mapping[p] + 1) for p in positions]
    if positions and positions[-1] == layers - 1:
        # The student's last output stands for the teacher's last output (after the final norm in most decoders),
        # also when the original's last layer was dropped.
        pairs[-1] = (-1, -1)
    return pairs


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits from its last hidden state (the output embedding, then Gemma 2's soft cap): the same
    as ``model(...).logits``, checked on every supported decoder family by the tests."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def logits_from_block_output(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits from its last block's output: the final norm, then ``logits_from_hidden``."""
    path = family_of(model).final_norm
    if not path:
        raise LayerfoldError(f"--block-kl: no final norm known for {type(model.base_model).__name__}")
    hidden = model.base_model.get_submodule(path)(hidden)
    owner = model.base_model.get_submodule(path.rpartition(".")[0]) if "." in path else model.base_model
    if getattr(owner, "project_out", None) is not None:  # OPT with a narrower embedding
        hidden = owner.project_out(hidden)
    return logits_from_hidden(model, hidden)


def head_kl(model: nn.Module, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ folded) of the next-token distributions that ``model``'s final norm and head read from the
    last block's output (``output``) and the original's (``target``), averaged over the unpadded tokens: the
    block-wise stage's optional term for the last unit (``--block-kl``)."""
    keep = mask.bool()
    student = F.log_softmax(logits_from_block_output(model, output[keep]).float(), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(logits_from_block_output(model, target[keep].to(output.dtype)).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / keep.sum().clamp(min=1)


def _chunk_terms(hidden, p, indices, targets, head, temperature: float, kl: bool, lm: bool) -> torch.Tensor:
    """Summed cross-entropy against the teacher's p (full, or its top-k ``indices``) and summed LM loss of one
    chunk of tokens, from the student's hidden states."""
    logits = head(hidden).float()
    terms = []
    if kl:
        scores = logits if temperature == 1 else logits / temperature
        if indices is None:
            terms.append(F.cross_entropy(scores, p, reduction="sum"))
        else:  # the teacher's top-k tokens, renormalised; the student over the whole vocabulary
            terms.append((torch.logsumexp(scores, dim=-1) - (p * scores.gather(-1, indices.long())).sum(-1)).sum())
    if lm:
        terms.append(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
    return torch.stack(terms)


def token_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    *,
    student_head,
    teacher_head=None,
    temperature: float = 1.0,
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_tokens: int = 128,
) -> dict[str, torch.Tensor]:
    """The kl and lm losses of a decoder, computed a chunk of tokens at a time from the last hidden states.

    A (tokens × vocabulary) logits tensor is hundreds of MB: built whole, every temporary made from it costs
    seconds of page faults on a CPU. Chunks of 128 tokens stay small, and each chunk's logits are recomputed in
    the backward pass (activation checkpointing) instead of being kept. KL(p ‖ q) is computed as CE(p, q) − H(p),
    cross-entropy with soft targets being one fused kernel and the entropy needing no gradient."""
    from torch.utils.checkpoint import checkpoint

    mask = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # position i predicts token i + 1
    hidden, targets = student_hidden[mask], targets[mask]
    teacher_rows = teacher_hidden[mask] if teacher_hidden is not None else None
    cached_rows = tuple(t[mask] for t in cached) if cached is not None else None
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    lm_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        p = indices = None
        if weights.kl:
            with torch.no_grad():
                if cached_rows is not None:
                    values, indices = cached_rows[0][part], cached_rows[1][part]
                else:
                    values = teacher_head(teacher_rows[part])
                log_p = F.log_softmax(values.float() / temperature, dim=-1)
                p = log_p.exp()
                negative_entropy = (p * log_p).sum()
        terms = checkpoint(
            _chunk_terms,
            hidden[part],
            p,
            indices,
            targets[part],
            student_head,
            temperature,
            bool(weights.kl),
            bool(weights.lm),
            use_reentrant=False,
        )
        if weights.kl:
            kl_sum = kl_sum + terms[0] + negative_entropy  # CE(p, q) − H(p)
        if weights.lm:
            lm_sum = lm_sum + terms[-1]
    parts = {}
    if weights.kl:
        # Scaled by T² so that gradients keep their size across temperatures (Hinton et al.).
        parts["kl"] = kl_sum / hidden.shape[0] * temperature**2
    if weights.lm:
        parts["lm"] = lm_sum / (targets != -100).sum().clamp(min=1)
    return parts


def distillation_losses(
    student_out,
    teacher_out,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    *,
    student_head=None,
    teacher_head=None,
    temperature: float = 1.0,
    hidden_pairs: list[tuple[int, int]] = (),
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each active loss (unweighted) for one batch, in the registry's order. Both outputs carry
    ``hidden_states``; ``hidden_pairs`` are (student, teacher) indices into them. ``student_head``/``teacher_head``
    turn last hidden states into logits (decoders); ``cached`` is the teacher's (top-k logits, their token ids),
    used instead of its logits."""
    active = weights.active()
    parts: dict[str, torch.Tensor] = {}
    if any(LOSSES[name].compute is None for name in active):
        parts.update(
            token_losses(
                student_out.hidden_states[-1],
                teacher_out.hidden_states[-1] if teacher_out is not None else None,
                batch,
                weights,
                student_head=student_head,
                teacher_head=teacher_head,
                temperature=temperature,
                cached=cached,
            )
        )
    context = LossContext(list(hidden_pairs), student_head, teacher_head, temperature, cached)
    for name in active:
        if LOSSES[name].compute is not None:
            parts[name] = LOSSES[name].compute(student_out, teacher_out, batch, context)
    return parts


def needs_teacher_pass(weights: LossWeights, cached: bool) -> bool:
    """Whether a batch needs the teacher's forward pass: some active loss reads the teacher, and not only what
    the teacher cache (``cached``) holds."""
    return any(LOSSES[n].reads_teacher and not (cached and LOSSES[n].in_teacher_cache) for n in weights.active())


def hidden_loss(student_out, teacher_out, batch, context: LossContext) -> torch.Tensor:
    mask = batch["attention_mask"].bool()
    errors = []
    for s, t in context.hidden_pairs:
        hs, ht = student_out.hidden_states[s][mask].float(), teacher_out.hidden_states[t][mask].float()
        errors.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp(min=1e-12))
    return torch.stack(errors).mean()


def cosine_loss(student_out, teacher_out, batch, context: LossContext) -> torch.Tensor:
    student = mean_pool(student_out.hidden_states[-1].float(), batch["attention_mask"])
    teacher = mean_pool(teacher_out.hidden_states[-1].float(), batch["attention_mask"])
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


register_loss(Loss("kl", "forward KL(teacher ‖ student) of next-token distributions at --temperature", "decoders",
                   in_teacher_cache=True))  # fmt: skip
register_loss(Loss("lm", "the student's own next-token cross-entropy on the data", "decoders", reads_teacher=False))
register_loss(Loss("hidden", "relative squared error ‖h_s − h_t‖² / ‖h_t‖² of hidden states at --hidden-layers "
                   "(FoldGPT's tail-layer distillation when those are the last few layers)", compute=hidden_loss))  # fmt: skip
register_loss(Loss("cosine", "1 − cosine of mean-pooled sentence embeddings", "encoders", compute=cosine_loss))
