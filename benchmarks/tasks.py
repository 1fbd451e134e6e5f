"""The model tasks of every benchmark: one type (``Task``) and one builder per real model and protocol.

A task is a real model, the figures a row of it is measured by (``measures``, by column; ``metric`` the headline
one), the text it is calibrated on and, where a script heals, the heal data and budget. The *test* builders
(``minilm``, ``mpnet``, ``smollm2``, ``gemma3``) report on the evaluation sets (STS-B test, WikiText-2's second
half) for the sweep, the heal and the planner's rows; the *dev* builders (``minilm_dev``, ``smollm2_dev``) measure
on development data, for the scripts that choose something (forms, widths, losses, calibration mixes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from common import (
    DATA,
    calibration_data,
    gemma3_dir,
    mpnet_dir,
    off_domain_fidelity,
    off_domain_perplexity,
    smollm2_dir,
    written_text,
)

from layerfold.checkpoints.folded import load_tokenizer
from layerfold.core.texts import DataSource, read_sts, text_lines, wikitext_half
from layerfold.evaluation.metrics import embedding_fidelity, perplexity, sentence_embeddings, sts_spearman
from layerfold.evaluation.metrics import tokenize_text
from layerfold.heal import HealConfig
from layerfold.jobs.demo import default_model_path

Measure = Callable[[torch.nn.Module, torch.nn.Module], float]  # (model, original) -> one figure

WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
DEV_CHARS = 30_000  # the end of WikiText's first half that no calibration or heal text reads (decoders' dev text)
DEV_TOKENS = 4096
MINILM_HEAL = HealConfig(steps=150, batch=64, lr=2e-4, eval_every=50, seed=0)
SMOLLM2_HEAL = HealConfig(steps=24, batch=4, seq_len=512, lr=1e-4, eval_every=12, save_every=1000, seed=0)


@dataclass
class Task:
    model: str  # its name in the tables
    path: Path
    metric: str  # the headline column of ``measures``
    higher_is_better: bool
    cap: str  # what the headline is measured on
    measures: dict[str, Measure]
    calibration: DataSource
    calibration_text: str
    tokens: int  # calibration tokens
    runtime_inputs: dict = field(default_factory=dict)  # texts (encoders) or token_ids (decoders), only timed
    # Text unlike the calibration data: (what it is, a measure), common.off_domain_*.
    off_domain: tuple[str, Measure] | None = None
    accuracies: Callable[[torch.nn.Module], dict] | None = None  # lm-eval's zero-shot accuracies (decoders)
    heal_data: DataSource | None = None  # the heal's text (by default the calibration text)
    heal: HealConfig | None = None

    def __post_init__(self):
        if self.heal_data is None:
            self.heal_data = self.calibration

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.path)

    def figures(self, model, original=None) -> dict[str, float]:
        with torch.no_grad():
            return {column: measure(model, original) for column, measure in self.measures.items()}

    def value(self, model, original=None) -> float:
        with torch.no_grad():
            return self.measures[self.metric](model, original)

    def keeping(self, *columns: str, **more: Measure) -> Task:
        """This task measured by ``columns`` of its measures and ``more``."""
        return dataclasses.replace(self, measures={**{c: self.measures[c] for c in columns}, **more})


def sts_test_pairs(quick: bool) -> list:
    """STS-B test (--quick: its first 300 pairs)."""
    return read_sts(DATA / "stsbenchmark" / "sts-test.csv", limit=300 if quick else None)


# ---- evaluation-set tasks (the sweep, the heal, the planner's rows) --------------------------------------------
def sts_test(model: str, path: Path, *, quick: bool, one_domain: bool = False, all_pairs: bool = False,
             tokens: int | None = None) -> Task:  # fmt: skip
    """An encoder on STS-B test (Spearman × 100; --quick: the first 300 pairs unless ``all_pairs``), calibrated
    on STS-B train sentences (and pydoc paragraphs)."""
    pairs = sts_test_pairs(quick and not all_pairs)
    tokenizer = load_tokenizer(path)
    source, what = calibration_data(DATA / "stsbenchmark" / "sts-train.csv", "STS-B train sentences",
                                    one_domain=one_domain)  # fmt: skip
    return Task(
        model, path, "spearman", True, f"STS-B test, {len(pairs)} pairs",
        {"spearman": lambda m, _: sts_spearman(m, tokenizer, pairs)["value"]},
        source, what, tokens or (8192 if quick else 32768),
        runtime_inputs={"texts": [s for p in pairs for s in (p.first, p.second)]},
        off_domain=off_domain_fidelity(tokenizer, 128 if quick else 512),
        heal=MINILM_HEAL,
    )  # fmt: skip


def wikitext_test(model: str, path: Path, *, eval_tokens: int, tokens: int, one_domain: bool = False,
                  windows: str = ", 2,048-token windows", accuracies=None) -> Task:  # fmt: skip
    """A causal LM on WikiText-2 (second half) perplexity, calibrated and healed on the first half (and pydoc
    paragraphs); the run-time prompt is the first 1,024 tokens of the second half (only timed)."""
    tokenizer = load_tokenizer(path)
    ids = tokenize_text(tokenizer, wikitext_half(WIKITEXT, "second"))  # the whole half, tokenized once
    runtime_ids, ids = ids[:1024], ids[:eval_tokens]
    first_half = written_text("wikitext-2-test-first-half.txt", wikitext_half(WIKITEXT, "first"))
    source, what = calibration_data(first_half, "WikiText-2 test, first half", one_domain=one_domain)
    return Task(
        model, path, "perplexity", False,
        f"WikiText-2 test, second half (cut at the middle character), first {ids.numel()} tokens, "
        "non-overlapping 1,024-token windows",
        {"perplexity": lambda m, _: perplexity(m, ids, max_length=1024, stride=1024)["value"]},
        source, what + windows, tokens,
        runtime_inputs={"token_ids": runtime_ids.flatten().tolist()},
        off_domain=off_domain_perplexity(tokenizer, eval_tokens),
        accuracies=accuracies and (lambda m: accuracies(m, tokenizer)),
        heal=SMOLLM2_HEAL,
    )  # fmt: skip


def minilm(quick: bool = False, one_domain: bool = False, **options) -> Task:
    return sts_test("all-MiniLM-L6-v2", default_model_path(), quick=quick, one_domain=one_domain, **options)


def mpnet(quick: bool = False, one_domain: bool = False, **options) -> Task:
    return sts_test("all-mpnet-base-v2", mpnet_dir(), quick=quick, one_domain=one_domain, **options)


def smollm2(quick: bool = False, one_domain: bool = False, **options) -> Task:
    options = {"eval_tokens": 2048 if quick else 4096, "tokens": 8192 if quick else 65536, **options}
    return wikitext_test("SmolLM2-135M", smollm2_dir(), one_domain=one_domain, **options)


def gemma3(quick: bool = False, one_domain: bool = False, **options) -> Task:
    options = {"eval_tokens": 2048 if quick else 4096, "tokens": 8192 if quick else 65536, **options}
    return wikitext_test("gemma-3-270m", gemma3_dir(), one_domain=one_domain, **options)


# ---- development-data tasks (scripts that choose) --------------------------------------------------------------
def first_half_paragraphs(count: int = 256) -> list[str]:
    """The last ``count`` paragraphs of WikiText's first half (no calibration reads that far): text unlike STS-B."""
    first = wikitext_half(WIKITEXT, "first")
    return [line for line in text_lines(first) if len(line.split()) >= 8][-count:]


def fidelity_to_original(tokenizer, texts: list[str]) -> Measure:
    """The mean cosine of a model's embeddings of ``texts`` to the original's (computed once)."""
    reference: list[torch.Tensor] = []

    def measure(model, original) -> float:
        if not reference:
            reference.append(sentence_embeddings(original, tokenizer, texts))
        return embedding_fidelity(reference[0], sentence_embeddings(model, tokenizer, texts))["mean"]

    return measure


def minilm_dev(*, one_domain: bool = False, quick: bool = False) -> Task:
    """all-MiniLM-L6-v2 measured on STS-B dev (headline), STS-B test (reported) and the cosine to the original
    on WikiText first-half paragraphs; calibrated and healed as the test task (--quick: 300 pairs of each, 64
    paragraphs)."""
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    limit = 300 if quick else None
    dev, test = (read_sts(DATA / "stsbenchmark" / f"sts-{s}.csv", limit=limit) for s in ("dev", "test"))
    source, what = calibration_data(DATA / "stsbenchmark" / "sts-train.csv", "STS-B train sentences",
                                    one_domain=one_domain)  # fmt: skip
    return Task(
        "all-MiniLM-L6-v2", path, "STS-B dev", True, f"STS-B dev, {len(dev)} pairs",
        {"STS-B dev": lambda m, _: sts_spearman(m, tokenizer, dev)["value"],
         "STS-B test": lambda m, _: sts_spearman(m, tokenizer, test)["value"],
         "WikiText cosine": fidelity_to_original(tokenizer, first_half_paragraphs(64 if quick else 256))},
        source, what, 8192 if quick else 32768,
        runtime_inputs={"texts": [s for p in test for s in (p.first, p.second)]},
        off_domain=off_domain_fidelity(tokenizer, 128 if quick else 512),
        heal_data=DATA / "stsbenchmark" / "sts-train.csv",
        heal=dataclasses.replace(MINILM_HEAL, stage="e2e"),
    )  # fmt: skip


def smollm2_dev(*, one_domain: bool = False, quick: bool = False) -> Task:
    """SmolLM2-135M measured on WikiText dev (the last 30,000 characters of the first half, which calibration
    and heal leave out; headline), Shakespeare's first half (its last tokens) and WikiText test (reported)."""
    path = smollm2_dir()
    tokenizer = load_tokenizer(path)
    tokens = 2048 if quick else DEV_TOKENS
    first = wikitext_half(WIKITEXT, "first")
    own = written_text("wikitext-first-half-without-dev.txt", first[:-DEV_CHARS])
    source, what = calibration_data(own, "WikiText-2 test, first half without its last 30,000 characters",
                                    one_domain=one_domain)  # fmt: skip
    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    shakespeare = shakespeare[: len(shakespeare) // 2]
    second = wikitext_half(WIKITEXT, "second")
    ids = {"WikiText dev ppl": tokenizer(first[-DEV_CHARS:], return_tensors="pt").input_ids[0][:tokens],
           "Shakespeare dev ppl": tokenizer(shakespeare, return_tensors="pt").input_ids[0][-tokens:],
           "WikiText test ppl": tokenizer(second, return_tensors="pt").input_ids[0][:tokens]}  # fmt: skip

    def perplexity_on(x: torch.Tensor) -> Measure:
        return lambda m, _: perplexity(m, x, max_length=1024, stride=1024)["value"]

    return Task(
        "SmolLM2-135M", path, "WikiText dev ppl", False, f"WikiText dev, first {tokens} tokens",
        {name: perplexity_on(x) for name, x in ids.items()},
        source, what, 8192 if quick else 32768,
        runtime_inputs={"token_ids": tokenize_text(tokenizer, second, 1024).flatten().tolist()},
        off_domain=off_domain_perplexity(tokenizer, tokens),
        heal=dataclasses.replace(SMOLLM2_HEAL, stage="e2e"),
    )  # fmt: skip


TEST_TASKS = {"minilm": minilm, "smollm2": smollm2, "mpnet": mpnet, "gemma3": gemma3}
DEV_TASKS = {"minilm": minilm_dev, "smollm2": smollm2_dev}
