"""Choose a fold for a size budget: build candidate plans from the analysis and the registered methods, fold
each, score it with a cheap proxy on held-out calibration data, keep the best.

Candidates (by ``allow``):

- ``drop``: remove the blocks with the smallest FoldGPT gates, the lowest Block Influence or angular distance
  (ShortGPT), evenly spaced blocks, or LaCo's merges of adjacent blocks.
- ``tie``: tie the layers into K groups by a fixed pattern (cycle, sequence) or by clustering the layers whose
  weights, outputs (CKA) or gradients agree most (average linkage); with ``drop`` as well, remove the blocks
  with the smallest gates for half the saving and tie the rest.
- ``lora``: a tie with one block fewer and the freed parameters spent on per-layer SVD-initialised LoRA.
- ``basis``: Basis Sharing and whitened SVD, with uniform ranks or ranks allocated by sensitivity.

Whole-block candidates keep ⌊budget⌋ blocks, and every folded candidate is counted: a plan that keeps more
unique parameters than the budget allows is retried with one block fewer or rejected, so the chosen plan never
exceeds the budget. The proxy is the mean KL divergence of next-token distributions from the original's
(decoders) or the mean cosine of mean-pooled sentence embeddings to the original's (encoders).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..analysis.measures import Analysis
from ..core.budget import Budget, kept_fractions
from ..engine.calibrate import Calibration
from ..core.errors import LayerfoldError
from ..evaluation.metrics import is_causal_lm, kl_sum_of, mean_pool
from ..core.families import family_of
from ..folding.in_memory import fold
from . import registry
from ..operations.tie.build import max_relaxation_rank, relaxation_params
from ..operations.plan import FoldPlan
from ..core.report import markdown_table, parameter_breakdown

ALLOW_CHOICES = ("drop", "tie", "basis", "lora", "width")


def parse_allow(text: str | Sequence[str] | None) -> tuple[str, ...]:
    items = ALLOW_CHOICES if text is None else [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    unknown = [t for t in items if t not in ALLOW_CHOICES]
    if unknown or not items:
        raise LayerfoldError(
            f"--allow: unknown kind '{unknown[0] if unknown else text}' (choose from {', '.join(ALLOW_CHOICES)})"
        )
    if "lora" in items and "tie" not in items:
        raise LayerfoldError("--allow lora relaxes tied blocks: allow tie as well (--allow tie,lora)")
    return tuple(dict.fromkeys(items))


# ---- the proxy -----------------------------------------------------------------------------------------------
class Proxy:
    """Fidelity to the original on held-out batches: KL of next-token distributions (decoders, lower is
    better) or cosine of mean-pooled embeddings (encoders, higher is better). ``score`` is higher-better."""

    def __init__(self, original: nn.Module, batches: Sequence[dict]) -> None:
        self.batches = list(batches)
        self.causal = is_causal_lm(original)
        self.name = "next-token KL" if self.causal else "embedding cosine"
        self.tokens = int(sum(int(b["attention_mask"].sum()) for b in self.batches))
        self.reference = [self._output(original, b) for b in self.batches]

    @torch.no_grad()
    def _output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        model.eval()
        if self.causal:
            return F.log_softmax(model(**batch, use_cache=False).logits.float(), dim=-1)
        return F.normalize(mean_pool(model(**batch).last_hidden_state.float(), batch["attention_mask"]), dim=-1)

    def value(self, model: nn.Module) -> float:
        return self._mean([self._output(model, b) for b in self.batches])

    @property
    def original(self) -> float:
        """The original's own value (0 KL, cosine 1): the references compared with themselves."""
        return self._mean(self.reference)

    def _mean(self, outputs: Sequence[torch.Tensor]) -> float:
        total = 0.0
        for batch, reference, output in zip(self.batches, self.reference, outputs):
            if self.causal:
                total += kl_sum_of(reference, output, batch["attention_mask"].bool())
            else:
                total += float((reference * output).sum())
        count = self.tokens if self.causal else sum(len(r) for r in self.reference)
        return total / count

    def score(self, value: float) -> float:
        return -value if self.causal else value


# ---- candidates ------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    kind: str
    plan: FoldPlan | None = None
    proxy: float | None = None
    keep: float | None = None
    keep_blocks: float | None = None
    seconds: float | None = None
    rejected: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "proxy": self.proxy,
            "keep": self.keep,
            "keep_blocks": self.keep_blocks,
            "seconds": self.seconds,
            "rejected": self.rejected,
            "plan_summary": self.plan.describe() if self.plan is not None else None,
        }


def _key(plan: FoldPlan) -> str:
    """What makes two candidates' plans the same: their operations (not the record of who made them)."""
    return json.dumps(plan.to_dict()["operations"], sort_keys=True)


def filling_rank(model: nn.Module, plan: FoldPlan, statistics, allowed: int, counted_key: str) -> int:
    """The largest relaxation rank (every projection of every tie alike, in each tie's form) that keeps the
    fold within ``allowed`` parameters: the fold without relaxations, plus what the forms store at that rank."""
    forms = [(op.rank, op.relax) for op in plan.ties()]
    for op in plan.ties():
        op.rank, op.relax = 0, "lora"
    size = fold(copy.deepcopy(model), plan, calibration=statistics, progress=False, sequential=False)
    base = parameter_breakdown(size)[counted_key]
    del size
    for op, (rank, relax) in zip(plan.ties(), forms):
        op.rank, op.relax = rank, relax
    return largest_rank(model, plan, allowed - base)


def relaxation_size(model: nn.Module, plan: FoldPlan, rank: int | None = None) -> int:
    """What the plan's tie relaxations store, each in its form: at ``rank`` for every projection if given,
    else at the plan's own ranks."""
    family = family_of(model)
    blocks = family.layer_list(model)
    return sum(relaxation_params(op, family, blocks[op.layers[0]], rank) for op in plan.ties())


def largest_rank(model: nn.Module, plan: FoldPlan, limit: float) -> int:
    """The largest rank (every projection of every tie alike) whose relaxations store at most ``limit``
    parameters; 0 when not even rank 1 fits."""
    family = family_of(model)
    blocks = family.layer_list(model)
    low, high = 0, min(max_relaxation_rank(op, family, blocks[op.layers[0]]) for op in plan.ties())
    while low < high:  # the size grows with the rank
        middle = (low + high + 1) // 2
        low, high = (middle, high) if relaxation_size(model, plan, middle) <= limit else (low, middle - 1)
    return low


@dataclass
class PlanSearch:
    budget: Budget
    allowed: int  # unique parameters the budget allows (of the counted kind)
    proxy_name: str
    proxy_tokens: int
    original_proxy: float
    candidates: list[Candidate]  # scored, best first
    rejected: list[Candidate]
    best_model: nn.Module | None = field(default=None, repr=False)
    refit_tokens: int | None = None  # best_model was folded again with this many calibration tokens
    refit_seconds: float | None = None
    seconds: float = 0.0  # the search, without the refit

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def explanation(self, top: int = 5) -> str:
        direction = "lower is better" if self.proxy_name == "next-token KL" else "higher is better"
        rows = [
            [
                str(rank + 1),
                c.name,
                f"{c.proxy:.4f}",
                f"{c.keep_blocks:.1%}",
                f"{c.keep:.1%}",
                c.plan.describe() if c.plan else "",
            ]
            for rank, c in enumerate(self.candidates[:top])
        ]
        lines = [
            f"Chose **{self.best.name}**: its {self.proxy_name} to the original on {self.proxy_tokens} held-out "
            f"calibration tokens is {self.best.proxy:.4f} ({direction}; the original itself scores "
            f"{self.original_proxy:.4f})"
            + (
                f", against {self.candidates[1].proxy:.4f} for the next best, {self.candidates[1].name}."
                if len(self.candidates) > 1
                else "."
            ),
            "",
            markdown_table(["#", "candidate", self.proxy_name, "blocks kept", "all kept", "plan"], rows),
        ]
        if self.refit_tokens:
            lines += [
                "",
                f"The chosen plan was then fitted again on all {self.refit_tokens} calibration tokens, the held-out "
                "ones included (the same ranks and size).",
            ]
        if self.rejected:
            lines += ["", "Not scored: " + "; ".join(f"{c.name} ({c.rejected})" for c in self.rejected) + "."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "allowed_parameters": self.allowed,
            "proxy": {"name": self.proxy_name, "tokens": self.proxy_tokens, "original": self.original_proxy},
            "best": self.best.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "rejected": [c.to_dict() for c in self.rejected],
            "refit_tokens": self.refit_tokens,
            "refit_seconds": self.refit_seconds,
            "seconds": self.seconds,
        }


def candidates(analysis: Analysis, allow: Sequence[str]) -> list[tuple[registry.Method, registry.Candidate]]:
    """Every registered method's candidates that ``allow`` admits, by kind (CANDIDATE_KINDS), then in the order
    of the registry."""
    found = [
        (method, candidate)
        for method in registry.REGISTRY.values()
        for candidate in method.candidates(analysis)
        if all(part in allow for part in candidate.kind.split("+"))
    ]
    return sorted(found, key=lambda pair: registry.CANDIDATE_KINDS.index(pair[1].kind))


def _planner_for(
    model: nn.Module, calibration: Calibration, analysis: Analysis, method: registry.Method, candidate: registry.Candidate
) -> Callable[[int | Budget], FoldPlan | None]:
    """The candidate's plan for K unique blocks (whole-block candidates) or for the budget."""
    layers = analysis.num_layers

    def make(size: int | Budget) -> FoldPlan | None:
        budget = Budget(size / layers, blocks_only=True) if candidate.in_blocks else size
        return method.plan(model, budget, calibration, analysis, **candidate.options)

    return make


def search(
    model: nn.Module,
    calibration: Calibration,
    analysis: Analysis,
    budget: Budget,
    proxy: Proxy,
    *,
    allow: Sequence[str] = ALLOW_CHOICES,
    keep_model: bool = True,
    refit: Calibration | None = None,
    progress: bool = True,
) -> PlanSearch:
    """Fold the original with every candidate the budget and ``allow`` admit, score each with ``proxy``, and
    return them best first (the best folded model in ``best_model`` when ``keep_model``).

    ``refit``: calibration to fold the chosen plan with once more, when it whitens (the same ranks, so the same
    size): the search fits on a subset and holds out the proxy's batches, the final model may use all the data.

    Over 80 lines: the search loop (fold, fit the relaxation rank, score, de-duplicate) reads best in one
    place; the proxy, the candidates and the budget are apart."""
    start = time.perf_counter()
    allow = parse_allow(allow)
    L = analysis.num_layers
    original_params = parameter_breakdown(model)
    counted_key = "blocks" if budget.blocks_only else "total"
    allowed = budget.counted(model) - budget.reduction(model)
    per_block = original_params["blocks"] / L
    block_allowance = allowed - (0 if budget.blocks_only else original_params["total"] - original_params["blocks"])
    whole_blocks = min(L, int(math.floor(block_allowance / per_block + 1e-9)))

    scored, rejected = [], []
    seen: dict[str, str] = {}  # plan JSON -> the candidate that made it first
    best_model, best_score = None, -math.inf
    statistics = None
    for method, entry in tqdm(candidates(analysis, allow), desc="planning", unit="candidate", disable=not progress):
        started = time.perf_counter()
        name, kind, in_blocks = entry.label, entry.kind, entry.in_blocks
        make = _planner_for(model, calibration, analysis, method, entry)
        candidate = Candidate(name, kind)
        if in_blocks and whole_blocks < (2 if kind == "lora" else 1):
            candidate.rejected = f"the budget leaves room for {max(whole_blocks, 0)} whole blocks"
            rejected.append(candidate)
            continue
        folded, blocks = None, whole_blocks - (1 if kind == "lora" else 0)
        # A plan another candidate already made (Block Influence and angular distance often rank the blocks
        # alike) is not folded again; ``keys`` are the plans this candidate makes on the way to its fold.
        keys, duplicate = [], None
        try:
            while folded is None:
                plan = make(blocks) if in_blocks else make(budget)
                if plan is None:
                    raise LayerfoldError("the method leaves the model as it is")
                keys.append(_key(plan))
                duplicate = seen.get(keys[-1])
                if duplicate is not None:
                    break
                if plan.whitens() and statistics is None:
                    statistics = calibration.statistics(progress=False)
                fitted = statistics if plan.whitens() else None
                if kind == "lora":
                    rank = filling_rank(model, plan, fitted, allowed, counted_key)
                    if rank < 1:
                        raise LayerfoldError("no room for a relaxation of rank 1")
                    for op in plan.ties():
                        op.rank = int(rank)
                # Candidates are scored as fitted to the original's inputs (sharing one SVD per matrix across
                # candidates); the chosen plan is refitted on all the data below.
                trial = fold(copy.deepcopy(model), plan, calibration=fitted, progress=False, sequential=False)
                if parameter_breakdown(trial)[counted_key] <= allowed:
                    folded = trial
                elif in_blocks and blocks > 1:
                    blocks -= 1  # per-layer norms and biases tipped it over: one block fewer
                else:
                    raise LayerfoldError("keeps more parameters than the budget allows")
        except LayerfoldError as err:
            candidate.rejected = str(err).split(": ")[-1] if ": " in str(err) else str(err)
            rejected.append(candidate)
            continue
        keys.append(_key(plan))  # as folded (a LoRA candidate's rank is set on the way)
        duplicate = duplicate or seen.get(keys[-1])
        if duplicate is not None:
            candidate.rejected = f"the same plan as {duplicate}"
            rejected.append(candidate)
            del folded
            continue
        seen.update(dict.fromkeys(keys, name))
        candidate.plan = plan
        candidate.proxy = proxy.value(folded)
        fractions = kept_fractions(original_params, parameter_breakdown(folded))
        candidate.keep, candidate.keep_blocks = fractions["keep"], fractions["keep_blocks"]
        candidate.seconds = round(time.perf_counter() - started, 2)
        scored.append(candidate)
        if proxy.score(candidate.proxy) > best_score:
            best_score = proxy.score(candidate.proxy)
            best_model = folded if keep_model else None
        del folded
    if not scored:
        reasons = "; ".join(dict.fromkeys(c.rejected for c in rejected)) or "no candidates"
        raise LayerfoldError(f"no allowed method fits {budget.option} {budget.keep:g}: {reasons}")
    scored.sort(key=lambda c: -proxy.score(c.proxy))
    for c in scored:
        c.plan.provenance = {"planner": c.name, "proxy": {proxy.name: c.proxy}}
    seconds = round(time.perf_counter() - start, 2)
    refit_tokens, refit_seconds = None, None
    best_plan = scored[0].plan
    if keep_model and refit is not None and best_plan.whitens():
        started = time.perf_counter()
        refitted = fold(
            copy.deepcopy(model), best_plan, calibration=refit.statistics(progress=progress), progress=False
        )
        if parameter_breakdown(refitted)[counted_key] <= allowed:
            best_model, refit_tokens = refitted, refit.settings["tokens"]
        refit_seconds = round(time.perf_counter() - started, 2)
    return PlanSearch(
        budget=budget,
        allowed=allowed,
        proxy_name=proxy.name,
        proxy_tokens=proxy.tokens,
        original_proxy=proxy.original,
        candidates=scored,
        rejected=rejected,
        best_model=best_model,
        refit_tokens=refit_tokens,
        refit_seconds=refit_seconds,
        seconds=seconds,
    )
