"""Healing: recover a folded model by distillation from its original, on Hugging Face ``Trainer``.

The student is a folded checkpoint, the teacher the original model. ``Trainer`` runs the loop and hands
distribution to accelerate, so ``accelerate launch -m layerfold heal ...`` runs the same command with DDP (or
FSDP) on many devices. What layerfold adds: the distillation losses, the choice of what trains, data packing,
a held-out fidelity check every N steps, an optional on-disk cache of the teacher's top-k logits, and
checkpoints that are themselves layerfold checkpoints (so a run killed at any moment resumes from the last
complete one).

Shared weights and FSDP: every shared tensor (a tie group's projection, a shared basis) lives once, in the
``layerfold_shared`` module at the base model's root, and the layers only point at it. Wrapping each
transformer block in its own FSDP unit (``fsdp_transformer_layer_cls_to_wrap``) therefore leaves all shared
tensors in the root unit, so a tied weight is never split across units. Use ``use_orig_params=True`` when only
part of the model trains (``--train relax``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data as datafiles
from .data import read_documents  # noqa: F401 (heal reads its data through it; tests import it from here)
from .errors import LayerfoldError
from .evaluate import embedding_fidelity, is_causal_lm, mean_pool, next_token_fidelity, sentence_embeddings
from .operations.base import FoldedProjection
from .store import fold_state
from .outputs import HEAL_SETTINGS_NAME

TRAIN_CHOICES = ("relax", "relax+shared", "all")
LOSS_NAMES = ("kl", "lm", "hidden", "cosine")
CHECKPOINT_PREFIX = "checkpoint-"
SETTINGS_NAME = HEAL_SETTINGS_NAME
REPORT_JSON = "heal.json"
REPORT_MD = "heal.md"


# ---- settings ---------------------------------------------------------------------------------------------
@dataclass
class LossWeights:
    """Weights of the distillation losses; a zero weight turns a loss off.

    - ``kl``: forward KL(teacher ‖ student) of next-token distributions at ``temperature`` (decoders).
    - ``lm``: the student's own next-token cross-entropy on the data (decoders).
    - ``hidden``: relative squared error ‖h_s − h_t‖² / ‖h_t‖² of hidden states at ``hidden_layers``
      (FoldGPT's tail-layer distillation when those are the last few layers).
    - ``cosine``: 1 − cosine of mean-pooled sentence embeddings (encoders).
    """

    kl: float = 0.0
    lm: float = 0.0
    hidden: float = 0.0
    cosine: float = 0.0

    @classmethod
    def default(cls, causal: bool) -> "LossWeights":
        return cls(kl=1.0) if causal else cls(cosine=1.0, hidden=1.0)

    @classmethod
    def parse(cls, text: str) -> "LossWeights":
        """``kl=1,hidden=0.5``; a bare name means weight 1."""
        weights = cls()
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            if not name:
                continue
            if name not in LOSS_NAMES:
                raise LayerfoldError(f"--loss: unknown loss '{name}' (choose from {', '.join(LOSS_NAMES)})")
            try:
                weight = float(value) if sep else 1.0
            except ValueError:
                raise LayerfoldError(f"--loss: weight of {name} must be a number, got '{value}'") from None
            if weight < 0 or not math.isfinite(weight):
                raise LayerfoldError(f"--loss: weight of {name} must be a finite number ≥ 0, got {value}")
            setattr(weights, name, weight)
        if not any(getattr(weights, n) for n in LOSS_NAMES):
            raise LayerfoldError(f"--loss: no loss has a positive weight in '{text}'")
        return weights

    def active(self) -> dict[str, float]:
        return {n: getattr(self, n) for n in LOSS_NAMES if getattr(self, n) > 0}


@dataclass
class HealConfig:
    """How to heal. ``None`` fields take a default that depends on the model kind (decoder or encoder)."""

    steps: int = 200
    lr: float = 1e-4
    batch: int = 8
    seq_len: int | None = None  # decoders: packed windows of 512 tokens; encoders: sentences cut at 128
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.0
    loss: LossWeights | None = None
    temperature: float = 1.0
    hidden_layers: list[int] = field(default_factory=lambda: [-1])  # student layer positions, negative from end
    train: str = "all"
    norms: bool | None = None  # train norm weights; default: yes for --train all, no otherwise
    eval_every: int | None = None  # default: steps // 10
    eval_examples: int | None = None  # held-out windows (decoders: 8) or sentences (encoders: 256)
    save_every: int | None = None  # default: steps // 4
    log_every: int | None = None  # default: steps // 20
    seed: int = 0
    teacher_cache: str | None = None
    top_k: int = 64
    max_examples: int | None = None  # use at most this many training windows/sentences

    def resolved(self, causal: bool) -> "HealConfig":
        """A copy with every default filled in for this model kind, after checking the values."""
        for name in ("steps", "batch", "grad_accum", "top_k"):
            if getattr(self, name) < 1:
                raise LayerfoldError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LayerfoldError(f"--lr must be a positive number, got {self.lr}")
        if self.temperature <= 0:
            raise LayerfoldError(f"--temperature must be positive, got {self.temperature}")
        if self.train not in TRAIN_CHOICES:
            raise LayerfoldError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got '{self.train}'")
        loss = self.loss or LossWeights.default(causal)
        if not causal and (loss.kl or loss.lm):
            raise LayerfoldError("the kl and lm losses need a causal language model; encoders heal with cosine/hidden")
        if causal and loss.cosine:
            raise LayerfoldError("the cosine loss is for encoders (sentence embeddings); decoders heal with kl/lm")
        if self.teacher_cache and (loss.hidden or loss.cosine or not loss.kl):
            raise LayerfoldError("--teacher-cache holds the teacher's top-k logits: use it with the kl loss only")
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
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: asdict(self.loss) if f.name == "loss" and self.loss else getattr(self, f.name) for f in fields(self)
        }


# ---- data -------------------------------------------------------------------------------------------------
def _sentences(texts: list[str], kind: str) -> list[str]:
    """Encoders train on sentence-sized units: STS-B sentences as they are, other texts split into lines."""
    if kind == "sts":
        return texts
    return [line for text in texts for line in datafiles.text_lines(text)]


@dataclass
class HealData:
    train: list[torch.Tensor]  # token ids per example
    held_out: list[torch.Tensor]
    held_out_texts: list[str]  # encoders: the held-out sentences (for the fidelity measure)
    kind: str
    tokens: int  # training tokens available


def prepare_data(
    tokenizer, path: str | Path, *, causal: bool, seq_len: int, held_out: int, limit: int | None
) -> HealData:
    """Decoders: every document tokenised, an end-of-text token between documents, packed into windows of
    ``seq_len`` (the tail shorter than a window is dropped). Encoders: one example per sentence, cut at
    ``seq_len``. The last ``held_out`` examples are kept out of training for the fidelity check."""
    texts, kind = read_documents(path)
    if causal:
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for text in texts:
            stream.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            if eos is not None and len(texts) > 1:
                stream.append(eos)
        ids = torch.tensor(stream, dtype=torch.long)
        count = ids.numel() // seq_len
        examples = list(ids[: count * seq_len].view(count, seq_len)) if count else []
        units: list[str] = [""] * len(examples)
        need = f"at least {held_out + 1} windows of {seq_len} tokens"
    else:
        units = list(dict.fromkeys(_sentences(texts, kind)))  # unique, in order
        encoded = tokenizer(units, truncation=True, max_length=seq_len).input_ids
        examples = [torch.tensor(e, dtype=torch.long) for e in encoded]
        need = f"at least {held_out + 1} sentences"
    if len(examples) <= held_out:
        raise LayerfoldError(
            f"{path}: too little data to heal: {len(examples)} examples, need {need} "
            "(a training set and a held-out slice)"
        )
    train, held = examples[:-held_out], examples[-held_out:]
    if limit is not None:
        train = train[:limit]
    return HealData(train, held, units[-held_out:], kind, int(sum(t.numel() for t in train)))


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[torch.Tensor]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.examples[index], "index": index}


@dataclass
class _Collator:
    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"] for item in items]
        width = max(t.numel() for t in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, t in enumerate(ids):
            input_ids[row, : t.numel()] = t
            attention_mask[row, : t.numel()] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }


# ---- what trains ------------------------------------------------------------------------------------------
def select_trainable(model: nn.Module, train: str, norms: bool) -> dict[str, int]:
    """Set ``requires_grad`` by the ``--train`` choice and return parameter counts by role.

    relax: each layer's own relaxation (a tied projection's LoRA factors, a factorised projection's
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
        param.requires_grad_(trains)
        role = "relax" if pid in relax else "shared" if pid in shared else "norms" if pid in norm else "other"
        counts[role] += param.numel()
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if trains else 0
    if counts["trainable"] == 0:
        what = {"relax": "per-layer relaxations", "relax+shared": "relaxations or shared weights"}.get(train, "")
        raise LayerfoldError(f"nothing to train with --train {train}: the folded model has no {what} (use --train all)")
    return counts


# ---- distillation -----------------------------------------------------------------------------------------
def teacher_layer_map(plan) -> list[int]:
    """For each layer of the folded model, the original layer whose output it stands in for: itself, or after
    a LaCo merge the last layer it absorbed."""
    reach = list(range(plan.num_layers))
    for merge in plan.merges():
        reach[merge.into] = max([reach[merge.into]] + [reach[k] for k in merge.layers])
    return [reach[layer] for layer in plan.kept_layers()]


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits from its last hidden state (the output embedding, then Gemma 2's soft cap): the same
    as ``model(...).logits``, checked on every supported decoder family by the tests."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
    """Each active loss (unweighted) for one batch. Both outputs carry ``hidden_states``; ``hidden_pairs`` are
    (student, teacher) indices into them. ``student_head``/``teacher_head`` turn last hidden states into logits
    (decoders); ``cached`` is the teacher's (top-k logits, their token ids), used instead of its logits."""
    mask = batch["attention_mask"].bool()
    parts: dict[str, torch.Tensor] = {}
    if weights.kl or weights.lm:
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
    if weights.hidden:
        errors = []
        for s, t in hidden_pairs:
            hs, ht = student_out.hidden_states[s][mask].float(), teacher_out.hidden_states[t][mask].float()
            errors.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp(min=1e-12))
        parts["hidden"] = torch.stack(errors).mean()
    if weights.cosine:
        student = mean_pool(student_out.hidden_states[-1].float(), batch["attention_mask"])
        teacher = mean_pool(teacher_out.hidden_states[-1].float(), batch["attention_mask"])
        parts["cosine"] = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return parts


# ---- teacher cache ----------------------------------------------------------------------------------------
def _teacher_fingerprint(teacher_path: Path) -> str:
    """Identifies the teacher's weights by path, size and modification time of its files."""
    files = [teacher_path] if teacher_path.is_file() else sorted(p for p in teacher_path.iterdir() if p.is_file())
    return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


@torch.no_grad()
def teacher_top_k(
    teacher: nn.Module, examples: list[torch.Tensor], *, top_k: int, cache_dir: str | Path, fingerprint: str
) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """The teacher's top-k logits and token ids for every training window, from ``cache_dir`` when an earlier
    run over the same teacher and data left them there. Returns (values, indices, file, hit)."""
    from safetensors.torch import load_file, save_file

    ids = torch.stack(examples)
    digest = hashlib.sha256(fingerprint.encode() + str(top_k).encode() + ids.numpy().tobytes()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    file = cache_dir / f"teacher-top{top_k}-{digest}.safetensors"
    if file.is_file():
        tensors = load_file(file)
        return tensors["values"], tensors["indices"], file, True
    values = torch.empty((*ids.shape, top_k), dtype=torch.float32)
    indices = torch.empty((*ids.shape, top_k), dtype=torch.int32)
    teacher.eval()
    for row in tqdm(range(ids.shape[0]), desc="teacher top-k", unit="window"):
        logits = teacher(ids[row : row + 1]).logits[0].float()
        top = logits.topk(top_k, dim=-1)
        values[row], indices[row] = top.values, top.indices.to(torch.int32)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.partial")  # several processes may build it
        save_file({"values": values, "indices": indices}, tmp)
        os.replace(tmp, file)
    except OSError as err:
        raise LayerfoldError(f"cannot write the teacher cache in {cache_dir}: {err.strerror or err}") from None
    return values, indices, file, False


# ---- the trainer ------------------------------------------------------------------------------------------
def _make_trainer_class():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """Trainer whose loss is distillation from a frozen teacher, whose evaluation is fidelity to the teacher
        on a held-out slice, and whose checkpoints are layerfold checkpoints."""

        def __init__(
            self,
            *args,
            teacher,
            heal: HealConfig,
            hidden_pairs,
            held_out,
            held_out_texts,
            tokenizer,
            source,
            cache=None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.teacher.requires_grad_(False)
            self.heal = heal
            self.hidden_pairs = hidden_pairs
            self.held_out = held_out
            self.held_out_texts = held_out_texts
            self.tokenizer = tokenizer
            self.source = source
            self.cache = cache
            self.causal = is_causal_lm(self.model)
            self.tokens_seen = 0
            self._parts: dict[str, list[float]] = {}
            self._reference_embeddings = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            index = inputs.pop("index")
            # Decoders: HF computes logits for the last position only; the losses compute the rest in chunks.
            kwargs = {"output_hidden_states": True, **({"logits_to_keep": 1} if self.causal else {})}
            student_out = model(**inputs, **kwargs)
            teacher_out, cached = None, None
            if self.cache is not None:
                cached = tuple(t[index.cpu()].to(inputs["input_ids"].device) for t in self.cache)
            if (self.heal.loss.kl and self.cache is None) or self.heal.loss.hidden or self.heal.loss.cosine:
                with torch.no_grad():
                    teacher_out = self.teacher(**inputs, **kwargs)
            student = self.accelerator.unwrap_model(model)
            parts = distillation_losses(
                student_out,
                teacher_out,
                inputs,
                self.heal.loss,
                student_head=functools.partial(logits_from_hidden, student) if self.causal else None,
                teacher_head=functools.partial(logits_from_hidden, self.teacher) if self.causal else None,
                temperature=self.heal.temperature,
                hidden_pairs=self.hidden_pairs,
                cached=cached,
            )
            loss = sum(getattr(self.heal.loss, name) * value for name, value in parts.items())
            if model.training:
                self.tokens_seen += int(inputs["attention_mask"].sum())
                for name, value in parts.items():
                    self._parts.setdefault(name, []).append(float(value.detach()))
            return (loss, student_out) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs:  # a training log: add the mean of each loss since the last one
                for name, values in self._parts.items():
                    logs[f"loss_{name}"] = round(sum(values) / len(values), 6)
                self._parts = {}
            super().log(logs, *args, **kwargs)

        @torch.no_grad()
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
            """Fidelity to the teacher on the held-out slice, as ``layerfold eval --task fidelity`` measures it."""
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            if self.causal:
                ids = torch.cat(self.held_out).to(self.args.device)
                result = next_token_fidelity(self.teacher, model, ids, max_length=self.heal.seq_len)
                metrics = {
                    f"{metric_key_prefix}_kl": result["value"],
                    f"{metric_key_prefix}_top1_agreement": result["top1_agreement"],
                }
            else:
                if self._reference_embeddings is None:
                    self._reference_embeddings = sentence_embeddings(
                        self.teacher, self.tokenizer, self.held_out_texts, max_length=self.heal.seq_len
                    )
                candidate = sentence_embeddings(
                    model, self.tokenizer, self.held_out_texts, max_length=self.heal.seq_len
                )
                metrics = {
                    f"{metric_key_prefix}_cosine": embedding_fidelity(self._reference_embeddings, candidate)["mean"]
                }
            model.train(was_training)
            self.log(metrics)
            return metrics

        def _save(self, output_dir=None, state_dict=None) -> None:
            from .io import write_folded

            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            write_folded(self.accelerator.unwrap_model(self.model), output_dir, source=self.source)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
            from .io import read_weights

            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            model.load_state_dict(read_weights(resume_from_checkpoint), strict=True)

    return DistillationTrainer


# ---- checkpoints ------------------------------------------------------------------------------------------
def checkpoint_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


def last_complete_checkpoint(folder: Path, *, clean: bool = True) -> Path | None:
    """The newest checkpoint whose trainer state was written (the last file Trainer writes); ``clean`` removes
    the partial ones a killed run left."""
    if not folder.is_dir():
        return None
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for partial in set(found) - set(complete) if clean else ():  # a run killed while writing one
        shutil.rmtree(partial, ignore_errors=True)
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def _check_checkpoint_folder(folder: Path) -> None:
    """OUT.checkpoints is removed by --overwrite: it may only hold an earlier heal run's checkpoints."""
    if folder.exists() and not (folder.is_dir() and ((folder / SETTINGS_NAME).is_file() or not any(folder.iterdir()))):
        raise LayerfoldError(f"{folder} is where this run keeps its checkpoints, but it holds something else; move it away")


def _prepare_checkpoints(folder: Path, settings: dict, *, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    settings_file = folder / SETTINGS_NAME
    if not is_main:
        # The main process checks, clears and creates the folder (the others would see it appear and refuse).
        return last_complete_checkpoint(folder, clean=False) if resume else None
    _check_checkpoint_folder(folder)
    if folder.exists() and not resume:
        if not overwrite:
            raise LayerfoldError(
                f"checkpoints of an earlier heal run are in {folder}: pass --resume to continue it "
                "or --overwrite to start over"
            )
        shutil.rmtree(folder)
    start = None
    if resume and folder.exists():
        if settings_file.is_file():
            before = json.loads(settings_file.read_text())
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise LayerfoldError(
                    f"--resume: the checkpoints in {folder} were made with other settings ({', '.join(changed)}); "
                    "use the same command, or --overwrite to start over"
                )
        start = last_complete_checkpoint(folder)
    if start is None and resume:
        print(f"layerfold: no complete checkpoint in {folder}; starting from the beginning")
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return start


def _check_resumable(checkpoint: Path) -> None:
    """A checkpoint to resume from must be whole: a sound folded checkpoint (its headers checked against the files;
    Trainer reads the weights themselves right after) and a readable trainer state."""
    from .io import check_checkpoint

    try:
        check_checkpoint(checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("trainer_state.json has no global_step")
    except (LayerfoldError, OSError, ValueError) as err:
        raise LayerfoldError(
            f"--resume: the checkpoint {checkpoint} is damaged ({err}); pass --overwrite to start over"
        ) from None


# ---- the whole step ---------------------------------------------------------------------------------------
def check_teacher(student: nn.Module, teacher: nn.Module, student_tokenizer, teacher_tokenizer) -> None:
    """The teacher must be the student's original architecture and speak the same vocabulary."""
    state = fold_state(student)
    expected = state.base_architecture
    if type(teacher).__name__ != expected:
        raise LayerfoldError(
            f"the teacher is a {type(teacher).__name__}, the folded model a {expected}: heal from the original model"
        )
    if teacher.config.vocab_size != student.config.vocab_size:
        raise LayerfoldError(
            f"the teacher's vocabulary has {teacher.config.vocab_size} tokens, the folded model's "
            f"{student.config.vocab_size}: heal from the original model"
        )
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise LayerfoldError("the teacher's tokenizer differs from the folded model's: heal from the original model")
    if teacher.config.hidden_size != student.config.hidden_size:
        raise LayerfoldError("the teacher's hidden size differs from the folded model's: heal from the original model")


def _optional_tokenizer(path: Path):
    """The teacher's tokenizer when its folder has one (a teacher may come as weights only)."""
    from .io import load_tokenizer

    try:
        return load_tokenizer(path)
    except LayerfoldError:
        return None


def heal(
    student_dir: str | Path,
    teacher_path: str | Path,
    data: str | Path,
    out: str | Path,
    config: HealConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    callbacks: list | None = None,
) -> dict:
    """Heal the folded model in ``student_dir`` by distillation from ``teacher_path`` (its original) on ``data``,
    and save it to ``out`` (atomically, with ``heal.json``/``heal.md``). Checkpoints go to ``OUT.checkpoints``
    and are removed at the end unless ``keep_checkpoints``. Returns the report."""
    from transformers import TrainingArguments, set_seed

    from .evaluate import is_causal_lm_class
    from .io import check_checkpoint, is_folded_checkpoint, load, load_source, load_tokenizer, save
    from .outputs import check_inputs, check_output

    student_dir, teacher_path, out = Path(student_dir), Path(teacher_path), Path(out)
    checked = check_checkpoint(student_dir)  # a clear line when it is not a (sound) folded checkpoint
    if not teacher_path.exists():
        raise LayerfoldError(f"teacher not found: {teacher_path}")
    if is_folded_checkpoint(teacher_path):
        raise LayerfoldError(f"the teacher {teacher_path} is a folded model; heal from the original model")
    if not Path(data).exists():
        raise LayerfoldError(f"data file not found: {data}")
    config = config or HealConfig()
    inputs = {"folded model": student_dir, "teacher": teacher_path, "data": data, "teacher cache": config.teacher_cache}
    check_output(out, inputs, overwrite=overwrite)
    checkpoints = checkpoint_dir_for(out)
    check_inputs(checkpoints, inputs, flag="the checkpoint folder")
    _check_checkpoint_folder(checkpoints)
    # Every argument is checked before a model loads.
    config = config.resolved(is_causal_lm_class(checked.model_class))
    mapping = teacher_layer_map(checked.plan)
    layers = len(mapping)
    if any(not -layers <= p < layers for p in config.hidden_layers):
        raise LayerfoldError(f"--hidden-layers: the folded model has {layers} layers, got {config.hidden_layers}")

    student = load(student_dir)
    causal = is_causal_lm(student)
    tokenizer = load_tokenizer(student_dir)
    teacher = load_source(teacher_path, dtype=torch.float32)
    check_teacher(student, teacher, tokenizer, _optional_tokenizer(teacher_path))
    saved_dtype = next(student.parameters()).dtype
    student.to(torch.float32)  # train in fp32; the healed model is saved in the folded model's dtype
    counts = select_trainable(student, config.train, config.norms)

    heal_data = prepare_data(
        tokenizer,
        data,
        causal=causal,
        seq_len=config.seq_len,
        held_out=config.eval_examples,
        limit=config.max_examples,
    )
    positions = sorted({p % layers for p in config.hidden_layers}) if config.loss.hidden else []
    # hidden_states[i + 1] is the output of layer i (hidden_states[0] is the embeddings).
    hidden_pairs = [(p + 1, mapping[p] + 1) for p in positions]
    if positions and positions[-1] == layers - 1:
        # The student's last output stands for the teacher's last output (after the final norm in most decoders),
        # also when the original's last layer was dropped.
        hidden_pairs[-1] = (-1, -1)

    settings = {
        "student": str(student_dir.resolve()),
        "teacher": str(teacher_path.resolve()),
        "data": str(Path(data).resolve()),
        **config.to_dict(),
    }
    is_main = int(os.environ.get("RANK", "0")) == 0
    start = _prepare_checkpoints(checkpoints, settings, resume=resume, overwrite=overwrite, is_main=is_main)
    if start is not None:
        _check_resumable(start)

    cache, cache_info = None, None
    if config.teacher_cache:
        values, indices, file, hit = teacher_top_k(
            teacher,
            heal_data.train,
            top_k=config.top_k,
            cache_dir=config.teacher_cache,
            fingerprint=_teacher_fingerprint(teacher_path),
        )
        cache, cache_info = (values, indices), {"file": str(file), "hit": hit, "top_k": config.top_k}

    set_seed(config.seed)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=int(config.warmup * config.steps),
        logging_steps=config.log_every,
        eval_strategy="steps",
        eval_steps=config.eval_every,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also makes a multi-process launch on CPUs use gloo
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )
    trainer_class = _make_trainer_class()
    trainer = trainer_class(
        model=student,
        args=args,
        train_dataset=_Examples(heal_data.train),
        eval_dataset=_Examples(heal_data.held_out),
        data_collator=_Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        callbacks=callbacks,
        teacher=teacher,
        heal=config,
        hidden_pairs=hidden_pairs,
        held_out=heal_data.held_out,
        held_out_texts=heal_data.held_out_texts,
        tokenizer=tokenizer,
        source=student_dir,
        cache=cache,
    )
    before = trainer.evaluate(metric_key_prefix="before")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    seconds = time.perf_counter() - started
    after = trainer.evaluate(metric_key_prefix="after")

    tokens = trainer.tokens_seen * trainer.accelerator.num_processes
    report = {
        "student": str(student_dir),
        "teacher": str(teacher_path),
        "data": {
            "path": str(data),
            "kind": heal_data.kind,
            "train_examples": len(heal_data.train),
            "train_tokens": heal_data.tokens,
            "held_out_examples": len(heal_data.held_out),
        },
        "settings": config.to_dict(),
        "parameters": counts,
        "resumed_from": str(start) if start else None,
        "steps": trainer.state.global_step,
        "final_train_loss": _last_train_loss(trainer.state.log_history),
        "train_loss_mean": result.training_loss,
        "tokens_this_run": tokens,
        "seconds_this_run": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "processes": trainer.accelerator.num_processes,
        "fidelity_before": before,
        "fidelity_after": after,
        "teacher_cache": cache_info,
        "log_history": trainer.state.log_history,
        "out": str(out),
    }
    if trainer.is_world_process_zero():
        student.to(saved_dtype)
        save(
            student,
            out,
            source=student_dir,
            overwrite=overwrite,
            extra_files={
                REPORT_JSON: json.dumps(report, indent=2, default=str) + "\n",
                REPORT_MD: heal_markdown(report) + "\n",
            },
        )
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return report


def _last_train_loss(history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses[-1] if losses else None


def heal_markdown(report: dict) -> str:
    from .report import markdown_table

    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    settings = report["settings"]
    rows = [
        ["folded model", report["student"]],
        ["teacher", report["teacher"]],
        [
            "data",
            f"{report['data']['path']} ({report['data']['kind']}, {report['data']['train_examples']} examples, "
            f"{report['data']['train_tokens']:,} tokens; {report['data']['held_out_examples']} held out)",
        ],
        ["steps", f"{report['steps']} × batch {settings['batch']} × {settings['grad_accum']} accumulation"],
        ["losses", ", ".join(f"{k}={v:g}" for k, v in settings["loss"].items() if v)],
        [
            "trains",
            f"{settings['train']} ({report['parameters']['trainable']:,} of "
            f"{report['parameters']['total']:,} parameters)",
        ],
        ["final training loss", fmt(report["final_train_loss"])],
        ["throughput", f"{fmt(report['tokens_per_second'])} tokens/s over {report['seconds_this_run']:.0f} s"],
    ]
    for key in report["fidelity_before"]:
        if key.startswith("before_") and not key.endswith(("runtime", "per_second")):
            name = key[len("before_") :]
            rows.append(
                [
                    f"held-out {name}",
                    f"{fmt(report['fidelity_before'][key])} → {fmt(report['fidelity_after'].get('after_' + name))}",
                ]
            )
    if report["resumed_from"]:
        rows.append(["resumed from", report["resumed_from"]])
    return markdown_table(["", "value"], rows)
