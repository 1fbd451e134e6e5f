"""Calibration: turn text into token batches, then measure the original model on them, one block at a time.

``collect_statistics`` runs the stack block by block: for block i it installs a one-block stack, feeds each
batch's hidden states from block i-1 into it (a forward pre-hook), stops the forward pass right after it (a
forward hook), and gathers with hooks on that block only:

- the Gram matrix XᵀX of every projection's input (float64, padding excluded) — what whitened SVD and Basis
  Sharing need;
- Block Influence (ShortGPT): 1 − cosine similarity of the block's input and output hidden states, averaged
  over tokens, and its angular variant arccos(cosine)/π.

Only one block's hidden states and hooks are live at a time, so memory grows with the calibration set and the
Gram matrices, not with the depth of the activations.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.texts import DataSource, interleave, is_mix, read_documents, text_lines
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm
from ..core.families import family_of, projection_shape

MIN_CALIBRATION_TOKENS = 256
DEFAULT_DECODER_WINDOW = 2048
DEFAULT_ENCODER_LENGTH = 128


@dataclass
class Statistics:
    """What calibration measured on the original model, indexed by original layer number."""

    tokens: int
    grams: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (layer, projection) -> XᵀX
    block_influence: list[float] = field(default_factory=list)
    angular_distance: list[float] = field(default_factory=list)
    # (layer, projection) -> mean squared gradient of the LM loss w.r.t. one output unit of the projection
    sensitivity: dict[tuple[int, str], float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    # Decompositions computed from these statistics, so that several budgets share one SVD per matrix.
    cache: dict = field(default_factory=dict, repr=False)
    # The calibration batches measured, for a sequential fit (``layerfold.engine.sequential``) to walk again.
    batches: list | None = field(default=None, repr=False)

    def gram(self, layer: int, projection: str) -> torch.Tensor:
        try:
            return self.grams[layer, projection]
        except KeyError:
            raise LayerfoldError(f"calibration has no statistics for layer {layer} {projection}") from None


# ---- batches ---------------------------------------------------------------------------------------------
def calibration_batches(
    model: nn.Module,
    tokenizer,
    source: DataSource | Sequence[str],
    *,
    tokens: int,
    window: int | None = None,
    batch_size: int = 32,
) -> list[dict[str, torch.Tensor]]:
    """Token batches with about ``tokens`` tokens from a text file, an STS-B file, a list of texts, or a mix of
    data files (a list of Paths: an equal share of the tokens from each, their batches interleaved).

    Decoders get the text as one token stream cut into fixed windows (``window`` tokens, one per batch).
    Encoders get sentences or paragraphs, each truncated to ``window`` tokens, padded in batches.
    """
    if tokens < MIN_CALIBRATION_TOKENS:
        raise LayerfoldError(f"--calib-tokens must be at least {MIN_CALIBRATION_TOKENS}, got {tokens}")
    if is_mix(source) and len(source) > 1:
        share = tokens // len(source)
        if share < MIN_CALIBRATION_TOKENS:
            raise LayerfoldError(
                f"--calib-tokens {tokens} over {len(source)} data files is {share} tokens each; each needs at least "
                f"{MIN_CALIBRATION_TOKENS} (give --calib-tokens {MIN_CALIBRATION_TOKENS * len(source)} or more)"
            )
        parts = [calibration_batches(model, tokenizer, path, tokens=share, window=window, batch_size=batch_size)
                 for path in source]  # fmt: skip
        return interleave(parts)
    if is_mix(source):
        source = source[0]
    where = str(source) if isinstance(source, (str, Path)) else "the calibration texts"
    # A path is read by the one loader every command uses (text, WikiText, STS-B, .jsonl, a datasets folder).
    documents, kind = read_documents(source) if isinstance(source, (str, Path)) else (list(source), "texts")
    if is_causal_lm(model):
        text = "\n".join(documents)  # an STS-B file: its sentences in order, one per line
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_DECODER_WINDOW
        window = min(window or DEFAULT_DECODER_WINDOW, limit)
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][:tokens]  # long on purpose
        if ids.numel() < MIN_CALIBRATION_TOKENS:
            raise LayerfoldError(
                f"calibration data too short: {where} has {ids.numel()} tokens, "
                f"at least {MIN_CALIBRATION_TOKENS} needed"
            )
        window = min(window, ids.numel())
        count = ids.numel() // window
        return [
            {
                "input_ids": ids[k * window : (k + 1) * window][None],
                "attention_mask": torch.ones(1, window, dtype=torch.long),
            }
            for k in range(count)
        ]
    if kind == "text":  # plain text and WikiText: its lines (paragraphs), without WikiText's title lines
        texts = [line for document in documents for line in text_lines(document)]
    else:  # STS-B sentences, .jsonl and datasets documents, given texts: as they are
        texts = [t for t in documents if t.strip()]
    length = window or DEFAULT_ENCODER_LENGTH
    batches, total = [], 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        batches.append(dict(batch))
        total += int(batch["attention_mask"].sum())
        if total >= tokens:
            break
    if total < MIN_CALIBRATION_TOKENS:
        raise LayerfoldError(
            f"calibration data too short: {where} has {total} tokens, at least {MIN_CALIBRATION_TOKENS} needed"
        )
    return batches


def batch_tokens(batches: Sequence[dict]) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


# ---- running part of the stack ---------------------------------------------------------------------------
@contextlib.contextmanager
def restricted_stack(model: nn.Module, indices: Sequence[int], blocks: Sequence[nn.Module] | None = None) -> Iterator:
    """Temporarily make the model's stack the given layers (by index), with the config entries the forward
    pass reads per layer (num_hidden_layers, layer_types) to match; everything is restored afterwards."""
    family = family_of(model)
    layers = family.layer_list(model)
    config = model.config
    saved_count, saved_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    chosen = list(blocks) if blocks is not None else [layers[i] for i in indices]
    family.set_layer_list(model, nn.ModuleList(chosen))
    config.num_hidden_layers = len(chosen)
    if isinstance(saved_types, (list, tuple)) and len(saved_types) == len(layers):
        config.layer_types = [saved_types[i] for i in indices]
    try:
        yield
    finally:
        family.set_layer_list(model, layers)
        config.num_hidden_layers = saved_count
        if saved_types is not None:
            config.layer_types = saved_types


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block of interest has run."""


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    projections: Sequence[str] | None = None,
    grams: bool = True,
    progress: bool = True,
) -> Statistics:
    """Measure the original model on calibration batches, one block at a time (see the module docstring)."""
    if not batches:
        raise LayerfoldError("calibration needs at least one batch of text")
    family = family_of(model)
    layers = family.layer_list(model)
    projections = tuple(projections or family.projections)
    model.eval()
    stats = Statistics(tokens=batch_tokens(batches), batches=list(batches))
    walk = BlockWalk(model, batches)
    for i in tqdm(range(len(layers)), desc="calibrating", unit="block", disable=not progress):
        influence, angular, accumulators = walk.measure(i, projections if grams else ())
        stats.block_influence.append(influence)
        stats.angular_distance.append(angular)
        for name, gram in accumulators.items():
            stats.grams[i, name] = gram
    return stats


class BlockWalk:
    """The calibration batches' hidden states, carried through the stack one block at a time: ``measure(i)``
    runs block i (the blocks must come in order) and returns its Block Influence, angular distance and the
    Gram matrices of the given projections' inputs. Only block i needs real weights: a streamed fold keeps
    the rest of the model on the meta device."""

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.batches = list(batches)
        self.masks = [b["attention_mask"].bool() for b in self.batches]
        self.tokens = batch_tokens(self.batches)
        self.hidden: list[torch.Tensor | None] = [None] * len(self.batches)

    @torch.no_grad()
    def measure(
        self,
        i: int,
        projections: Sequence[str] = (),
        *,
        on_input: Callable[[str, int, torch.Tensor], None] | None = None,
        advance: bool = True,
    ) -> tuple[float, float, dict[str, torch.Tensor]]:
        """``on_input(projection, batch, rows)``, if given, sees each projection's input rows (float32, padding
        excluded; projections that read the same tensor get the same rows). ``advance=False`` leaves the
        hidden states at block i's input (to run it again, e.g. after its weights change)."""
        model, hidden, masks = self.model, self.hidden, self.masks
        block = family_of(model).layer_list(model)[i]
        state: dict = {}
        accumulators: dict[str, torch.Tensor] = {}

        def feed(module, args, kwargs):
            state["input"] = _first(args) if args else kwargs["hidden_states"]
            if hidden[state["batch"]] is not None:
                return _replace_hidden(args, kwargs, hidden[state["batch"]])
            return None

        def stop(module, args, kwargs, output):
            state["input"] = hidden[state["batch"]] if hidden[state["batch"]] is not None else state["input"]
            state["output"] = _first(output)
            raise _Stop

        slot_of: dict[str, str] = {}  # projection -> the first projection that reads the same input

        def gram_hook(name):
            def hook(module, args):
                x = args[0]
                # q/k/v (and gate/up) read the same tensor: one product, one accumulator, shared. The entry
                # keeps x alive, so that no later input of this pass can reuse its address and be mistaken for it.
                key = (x.data_ptr(), tuple(x.shape))
                if key not in state["grams"] or state["grams"][key][0] is not x:
                    rows = x.reshape(-1, x.shape[-1])[state["mask"].reshape(-1)].float()  # OPT flattens tokens
                    state["grams"][key] = (x, rows.T @ rows, name)
                    if on_input is not None:
                        state["rows"][name] = rows
                _, product, slot = state["grams"][key]
                if on_input is not None:
                    on_input(name, state["batch"], state["rows"][slot])
                slot_of.setdefault(name, slot)
                if name != slot_of[name]:
                    return
                if name in accumulators:
                    accumulators[name] += product  # added in float64, without a float64 copy of the product
                else:
                    accumulators[name] = product.double()

            return hook

        handles = [block.register_forward_pre_hook(feed, with_kwargs=True)]
        handles.append(block.register_forward_hook(stop, with_kwargs=True))
        handles += [block.get_submodule(p).register_forward_pre_hook(gram_hook(p)) for p in projections]
        cosine_sum, angle_sum = 0.0, 0.0
        try:
            with restricted_stack(model, [i]):
                for b, batch in enumerate(self.batches):
                    state.update(batch=b, mask=masks[b], grams={}, rows={})
                    try:
                        model(**batch, use_cache=False) if is_causal_lm(model) else model(**batch)
                    except _Stop:
                        pass
                    else:
                        raise LayerfoldError(f"calibration: block {i} did not run in the forward pass")
                    x_in, x_out = state["input"], state["output"]
                    cosine = F.cosine_similarity(x_in[masks[b]].float(), x_out[masks[b]].float(), dim=-1)
                    cosine_sum += float(cosine.sum())
                    angle_sum += float(torch.arccos(cosine.clamp(-1.0, 1.0)).sum()) / math.pi
                    if advance:
                        hidden[b] = x_out.detach()
        finally:
            for handle in handles:
                handle.remove()
        grams = {name: accumulators[slot] for name, slot in slot_of.items()}
        return 1.0 - cosine_sum / self.tokens, angle_sum / self.tokens, grams

    @torch.no_grad()
    def calls(self, i: int) -> list[tuple[tuple, dict]]:
        """Block i's arguments for each batch, as the model calls it (attention mask, position embeddings), its
        hidden states those the walk has reached: what block-wise healing calls the block with, outside the
        model. Only the embeddings need real weights (the pass stops before block i runs)."""
        model, hidden = self.model, self.hidden
        block = family_of(model).layer_list(model)[i]
        captured: list[tuple[tuple, dict]] = []
        state: dict = {}

        def capture(module, args, kwargs):
            if hidden[state["batch"]] is not None:
                args, kwargs = _replace_hidden(args, kwargs, hidden[state["batch"]])
            captured.append((args, kwargs))
            raise _Stop

        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with restricted_stack(model, [i]):
                for b, batch in enumerate(self.batches):
                    state["batch"] = b
                    try:
                        model(**batch, use_cache=False) if is_causal_lm(model) else model(**batch)
                    except _Stop:
                        pass
                    else:
                        raise LayerfoldError(f"block-wise heal: block {i} did not run in the forward pass")
        finally:
            handle.remove()
        return captured


def collect_sensitivity(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    projections: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[tuple[int, str], float]:
    """How much the language-model loss cares about each projection's outputs: E‖∂L/∂y‖² / out_features,
    from backward hooks (an isotropic Fisher approximation: a change δy costs about that times ‖δy‖²).
    Causal LMs only; encoders have no loss without labels and get an empty result."""
    if not is_causal_lm(model):
        return {}
    family = family_of(model)
    layers = family.layer_list(model)
    projections = tuple(projections or family.projections)
    totals: dict[tuple[int, str], float] = {}

    def hook(key, out_features):
        def record(module, grad_input, grad_output):
            totals[key] = totals.get(key, 0.0) + float(grad_output[0].double().square().sum()) / out_features

        return record

    handles = []
    for i, block in enumerate(layers):
        for p in projections:
            module = block.get_submodule(p)
            handles.append(module.register_full_backward_hook(hook((i, p), projection_shape(module)[0])))
    flags = [param.requires_grad for param in model.parameters()]
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    tokens = 0
    try:
        for batch in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress):
            with torch.enable_grad():
                embedded = embeddings(batch["input_ids"]).detach().requires_grad_(True)
                output = model(
                    inputs_embeds=embedded,
                    attention_mask=batch["attention_mask"],
                    labels=batch["input_ids"],
                    use_cache=False,
                )
                output.loss.backward()
            tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    return {key: value / tokens for key, value in totals.items()}


class Calibration:
    """Calibration batches for one original model, and the statistics measured on them, computed on first
    use and kept (so that a sweep over methods and budgets calibrates once)."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[dict],
        settings: dict | None = None,
        *,
        mask_token_id: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.progress = progress  # bars for what is measured on first use (statistics, a method's analysis)
        self.batches = list(batches)
        self.settings = dict(settings or {}, tokens=batch_tokens(self.batches), batches=len(self.batches))
        self.mask_token_id = mask_token_id  # the tokenizer's, for an encoder's masked-token loss (analysis)
        self._statistics: Statistics | None = None
        self.derived: dict[str, Any] = {}  # what higher layers measure on these batches, kept (the analysis)
        self.sensitivity_batches = 4
        self.sensitivity_length = 1024

    def statistics(self, *, grams: bool = True, progress: bool | None = None) -> Statistics:
        progress = self.progress if progress is None else progress
        if self._statistics is None or (grams and not self._statistics.grams):
            stats = collect_statistics(self.model, self.batches, grams=grams, progress=progress)
            if grams:
                # A few short windows are enough to rank the projections (and backward passes are costly).
                few = [
                    {key: value[:, : self.sensitivity_length] for key, value in batch.items()}
                    for batch in self.batches[: self.sensitivity_batches]
                ]
                stats.sensitivity = collect_sensitivity(self.model, few, progress=progress)
            stats.settings = self.settings
            self._statistics = stats
        return self._statistics
