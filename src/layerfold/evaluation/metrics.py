"""Measuring what folding keeps: perplexity, STS-B Spearman, fidelity to a reference, size and speed.

Every measure returns a dict with ``task``, ``metric``, ``value`` and the settings it used.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..core.errors import LayerfoldError
from ..core.report import parameter_breakdown, weight_bytes

def is_causal_lm(model: nn.Module) -> bool:
    return is_causal_lm_class(type(model))


def is_causal_lm_class(model_class: type) -> bool:
    return model_class.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def require_kind(model: nn.Module | type, task: str, causal: bool) -> None:
    """``model`` may be the model or, before loading it, its class."""
    model_class = model if isinstance(model, type) else type(model)
    if is_causal_lm_class(model_class) != causal:
        kind = "a causal language model" if causal else "an encoder (sentence embeddings)"
        found = "a causal language model" if is_causal_lm_class(model_class) else "an encoder"
        raise LayerfoldError(f"task {task} needs {kind}; {model_class.__name__} is {found}")


# ---- encoders --------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each sequence's hidden states over its real tokens (padding excluded), in ``hidden``'s dtype:
    the sentence embedding of sentence-transformers, used by ``eval``, the heal loss and the planner's proxy."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int = 256
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers convention)."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        pooled = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        chunks.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(chunks)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine similarity between matching rows of two embedding matrices."""
    cosine = F.cosine_similarity(reference, candidate, dim=-1)
    return {"mean": cosine.mean().item(), "min": cosine.min().item(), "count": int(cosine.numel())}


def spearman_x100(predicted, gold) -> float:
    return float(spearmanr(predicted, gold).statistic) * 100


def sts_spearman(model: nn.Module, tokenizer, pairs, *, batch_size: int = 64) -> dict:
    """STS-B: Spearman × 100 between gold scores and the cosine of the two sentences' embeddings."""
    require_kind(model, "sts", causal=False)
    if len(pairs) < 2:
        raise LayerfoldError("task sts needs at least two sentence pairs")
    first = sentence_embeddings(model, tokenizer, [p.first for p in pairs], batch_size=batch_size)
    second = sentence_embeddings(model, tokenizer, [p.second for p in pairs], batch_size=batch_size)
    cosine = (first * second).sum(dim=-1)
    value = spearman_x100(cosine.tolist(), [p.score for p in pairs])
    return {
        "task": "sts",
        "metric": "spearman",
        "value": value,
        "settings": {"pairs": len(pairs), "pooling": "mean", "normalize": True, "max_length": 256},
    }


# ---- decoders --------------------------------------------------------------------------------------------
def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(
    model: nn.Module, input_ids: torch.Tensor, *, max_length: int = 1024, stride: int = 512, progress: bool = False
) -> dict:
    """Perplexity by the sliding-window method of the transformers documentation ("Perplexity of fixed-length
    models"): windows of ``max_length`` tokens advance by ``stride``; each token is scored once, with up to
    ``max_length - stride`` tokens of context carried over."""
    require_kind(model, "ppl", causal=True)
    if stride < 1 or stride > max_length:
        raise LayerfoldError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise LayerfoldError("task ppl needs at least two tokens of text")
    nll_sum, counted, previous_end = 0.0, 0, 0
    starts = list(range(0, ids.numel(), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        logits = model(window).logits[0, :-1].float()
        targets = window[0, 1:]
        # Score only the tokens not scored by an earlier window (the last end - previous_end of them).
        fresh = min(end - previous_end, targets.numel())
        losses = F.cross_entropy(logits[-fresh:], targets[-fresh:], reduction="sum")
        nll_sum += losses.item()
        counted += fresh
        previous_end = end
        if end == ids.numel():
            break
    return {
        "task": "ppl",
        "metric": "perplexity",
        "value": math.exp(nll_sum / counted),
        "settings": {"max_length": max_length, "stride": stride, "tokens": int(ids.numel()), "scored": counted},
    }


def kl_sum_of(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Σ KL(reference ‖ candidate) over token positions, from log-probabilities (..., vocab); ``mask`` picks the
    positions that count. The one KL of ``eval --task fidelity`` and the planner's proxy."""
    kl = (reference.exp() * (reference - candidate)).sum(-1)
    return float((kl[mask] if mask is not None else kl).sum())


@torch.no_grad()
def next_token_fidelity(
    reference: nn.Module, model: nn.Module, input_ids: torch.Tensor, *, max_length: int = 1024
) -> dict:
    """Mean KL(reference ‖ model) of next-token distributions and top-1 agreement, over non-overlapping windows."""
    require_kind(model, "fidelity", causal=True)
    ids = input_ids.reshape(-1)
    kl_sum, agree, count = 0.0, 0, 0
    for begin in range(0, ids.numel(), max_length):
        window = ids[begin : begin + max_length].unsqueeze(0)
        ref = F.log_softmax(reference(window).logits[0].float(), dim=-1)
        out = F.log_softmax(model(window).logits[0].float(), dim=-1)
        kl_sum += kl_sum_of(ref, out)
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        count += window.shape[1]
    return {
        "task": "fidelity",
        "metric": "kl",
        "value": kl_sum / count,
        "top1_agreement": agree / count,
        "settings": {"tokens": int(ids.numel()), "window": max_length},
    }


# ---- size and speed --------------------------------------------------------------------------------------
# Peak RSS is the process's own high-water mark, VmHWM (Linux). Not getrusage's ru_maxrss: the kernel carries
# that over from the parent across fork and exec, so a child of a large benchmark process would report the
# parent's size.
_PEAK_RSS = """
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
_RSS_PROBE = _PEAK_RSS + """
import json, sys
import layerfold.checkpoints.folded as io
before = peak_rss()
model = io.load_any(sys.argv[1])
after = peak_rss()
print(json.dumps({"peak_rss_bytes": after, "rss_before_load_bytes": before}))
"""


def _fresh_process(script: str, args: list[str], doing: str) -> dict:
    """Run a probe script in a fresh Python process; the JSON object on its last stdout line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LayerfoldError(f"{doing} in a fresh process failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_load_memory(path: str | Path) -> dict:
    """Peak resident memory of a fresh Python process that loads the model (and the same after imports only)."""
    return _fresh_process(_RSS_PROBE, [str(path)], f"loading {path}")


def size(model: nn.Module, path: str | Path, *, measure_memory: bool = True) -> dict:
    params = parameter_breakdown(model)
    memory = peak_load_memory(path) if measure_memory else {}
    return {
        "task": "size",
        "metric": "unique_parameters",
        "value": params["total"],
        "parameters": params,
        "bytes_on_disk": weight_bytes(path),
        **memory,
        "settings": {"fresh_process": measure_memory},
    }


@torch.no_grad()
def speed(
    model: nn.Module, tokenizer, texts: list[str], *, repeats: int = 3, new_tokens: int = 64, batch_size: int = 32
) -> dict:
    """Encoders: sentences per second. Decoders: greedy decode tokens per second with the KV cache.
    The median of ``repeats`` runs after one warm-up."""
    timings = []
    if is_causal_lm(model):
        prompt = tokenizer(texts[0], return_tensors="pt").input_ids[:, :64]
        settings = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        model.generate(prompt, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, **settings)
            timings.append(new_tokens / (time.perf_counter() - start))
        return {
            "task": "speed",
            "metric": "decode_tokens_per_second",
            "value": statistics.median(timings),
            "runs": timings,
            "settings": {
                "new_tokens": new_tokens,
                "prompt_tokens": prompt.shape[1],
                "repeats": repeats,
                "kv_cache": True,
                "threads": torch.get_num_threads(),
            },
        }
    sample = texts[: max(batch_size, min(len(texts), 256))]
    sentence_embeddings(model, tokenizer, sample[:batch_size], batch_size=batch_size)
    for _ in range(repeats):
        start = time.perf_counter()
        sentence_embeddings(model, tokenizer, sample, batch_size=batch_size)
        timings.append(len(sample) / (time.perf_counter() - start))
    return {
        "task": "speed",
        "metric": "sentences_per_second",
        "value": statistics.median(timings),
        "runs": timings,
        "settings": {
            "sentences": len(sample),
            "batch_size": batch_size,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
        },
    }


# ---- run-time cost in a fresh process -----------------------------------------------------------------------
# The protocol of every benchmark row (issue 17): decoders decode batch 1, greedy, with the KV cache, NEW tokens
# after a PROMPT-token prompt (decode tokens/s excludes the prompt's prefill: the time of NEW tokens minus that
# of one), and prefill one PREFILL-token sequence; encoders embed SENTENCES sentences in batches of 32. Every
# timing is the median of REPEATS runs after one warm-up. Peak RSS is the fresh process's, loading and running.
RUNTIME_PROTOCOL = {"prompt": 256, "new_tokens": 128, "prefill": 1024, "sentences": 256, "repeats": 3}
QUICK_RUNTIME_PROTOCOL = {"prompt": 64, "new_tokens": 32, "prefill": 256, "sentences": 256, "repeats": 3}

_RUNTIME_PROBE = _PEAK_RSS + """
import json, statistics, sys, time
import torch
import layerfold.checkpoints.folded as io
from layerfold.evaluation.metrics import is_causal_lm, sentence_embeddings

path, inputs_file, protocol = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
inputs = json.loads(open(inputs_file, encoding="utf-8").read())
imported = peak_rss()
model = io.load_any(path).eval()
tokenizer = io.load_tokenizer(path)
loaded = peak_rss()

def median_seconds(run):
    run()
    times = []
    for _ in range(protocol["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

result = {}
with torch.no_grad():
    if is_causal_lm(model):
        ids = torch.tensor(inputs["token_ids"])
        prompt = ids[None, : protocol["prompt"]]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        def generate(n):
            return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=pad)
        many, one = median_seconds(generate(protocol["new_tokens"])), median_seconds(generate(1))
        result["decode_tokens_per_second"] = (protocol["new_tokens"] - 1) / max(many - one, 1e-9)
        sequence = ids[None, : protocol["prefill"]]
        seconds = median_seconds(lambda: model(input_ids=sequence, use_cache=False))
        result["prefill_tokens_per_second"] = sequence.shape[1] / seconds
    else:
        texts = inputs["texts"][: protocol["sentences"]]
        seconds = median_seconds(lambda: sentence_embeddings(model, tokenizer, texts, batch_size=32))
        result["sentences_per_second"] = len(texts) / seconds
result["peak_rss_bytes"] = peak_rss()
result["rss_after_imports_bytes"] = imported
result["rss_after_load_bytes"] = loaded
result["threads"] = torch.get_num_threads()
print(json.dumps(result))
"""


def runtime_cost(
    path: str | Path, *, texts: list[str] | None = None, token_ids: list[int] | None = None, quick: bool = False
) -> dict:
    """Run-time cost of a saved model (original or folded), measured in a fresh Python process that loads and runs
    it: decode and prefill tokens/s for decoders (``token_ids``: the prompt and the prefill sequence), sentences/s
    for encoders (``texts``), and that process's peak resident memory. See ``RUNTIME_PROTOCOL``."""
    import tempfile

    protocol = QUICK_RUNTIME_PROTOCOL if quick else RUNTIME_PROTOCOL
    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8", delete=False) as handle:
        json.dump({"texts": texts or [], "token_ids": list(map(int, token_ids or []))}, handle)
    try:
        result = _fresh_process(_RUNTIME_PROBE, [str(path), handle.name, json.dumps(protocol)], f"running {path}")
    finally:
        os.unlink(handle.name)
    return {**result, "protocol": dict(protocol)}
