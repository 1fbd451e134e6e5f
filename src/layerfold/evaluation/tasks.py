"""The measurements ``layerfold eval --task`` makes, one registered ``EvalTask`` each.

A task says what it needs (``--data``, ``--reference``, a causal LM or an encoder), checks its inputs before a
model loads and measures. The CLI's ``--task`` choices and help and ``api.evaluate_path``'s checks come from
``TASKS``, so a new task is one ``register_task(EvalTask(...))`` here. The module imports no torch at its top:
the CLI lists the tasks before a command runs, so each task imports what it measures with when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import LayerfoldError, Registry


@dataclass(frozen=True)
class Measurement:
    """What ``layerfold eval`` was asked: the model's folder and the options a task may read."""

    model_path: Path
    data: Path | None = None
    reference: Path | None = None
    tasks: str | None = None
    max_tokens: int | None = None
    limit: int | None = None
    max_length: int = 1024
    stride: int = 512
    progress: bool = True


@dataclass(frozen=True)
class EvalTask:
    """One measurement. ``run(model, measurement)`` returns the result mapping (``task``, ``metric``,
    ``value``, ``settings`` and the task's own keys); ``check(measurement)`` refuses bad inputs before the model
    loads; ``causal``: the kind of model it measures (a causal LM, an encoder, or None for either)."""

    name: str
    summary: str
    run: Callable[[Any, Measurement], dict]
    needs_data: bool = False
    needs_reference: bool = False
    causal: bool | None = None
    check: Callable[[Measurement], None] | None = None
    takes_tasks: bool = False  # reads --tasks (a list of sub-tasks)


TASKS: Registry = Registry("task")
register_task = TASKS.add
get = TASKS.require


# ---- the tasks ----------------------------------------------------------------------------------------------
def _text_readable(m: Measurement) -> None:
    from ..core import texts as data

    if m.data is not None:
        data.read_text(m.data)  # a missing, empty or non-UTF-8 file fails here, before a model loads


def _check_sts(m: Measurement) -> None:
    from ..core import texts as data

    _text_readable(m)
    if not data.is_sts_file(m.data):
        raise LayerfoldError(f"{m.data}: not an STS-B file (tab-separated; score in column 5, sentences in 6 and 7)")


def _perplexity(model, m: Measurement) -> dict:
    from ..core import texts as data
    from . import metrics as ev
    from ..checkpoints.folded import load_tokenizer

    ids = ev.tokenize_text(load_tokenizer(m.model_path), data.read_text(m.data), m.max_tokens)
    return ev.perplexity(model, ids, max_length=m.max_length, stride=m.stride, progress=m.progress)


def _sts(model, m: Measurement) -> dict:
    from ..core import texts as data
    from . import metrics as ev
    from ..checkpoints.folded import load_tokenizer

    return ev.sts_spearman(model, load_tokenizer(m.model_path), data.read_sts(m.data, m.limit))


def _fidelity(model, m: Measurement) -> dict:
    from ..core import texts as data
    from . import metrics as ev
    from ..checkpoints.folded import load_any, load_tokenizer

    reference_model = load_any(m.reference)
    tokenizer = load_tokenizer(m.reference)
    if ev.is_causal_lm(reference_model) != ev.is_causal_lm(model):
        raise LayerfoldError("task fidelity needs the model and --reference to be of the same kind")
    if ev.is_causal_lm(model):
        ids = ev.tokenize_text(tokenizer, data.read_text(m.data), m.max_tokens or 4096)
        result = ev.next_token_fidelity(reference_model, model, ids, max_length=m.max_length)
    else:
        texts = data.text_units(m.data, m.limit or 512)
        cosine = ev.embedding_fidelity(
            ev.sentence_embeddings(reference_model, tokenizer, texts), ev.sentence_embeddings(model, tokenizer, texts)
        )
        result = {"task": "fidelity", "metric": "cosine", "value": cosine["mean"], "min": cosine["min"],
                  "settings": {"texts": cosine["count"], "pooling": "mean"}}  # fmt: skip
    result["reference"] = str(m.reference)
    return result


def _size(model, m: Measurement) -> dict:
    from . import metrics as ev

    return ev.size(model, m.model_path)


def _speed(model, m: Measurement) -> dict:
    from ..core import texts as data
    from . import metrics as ev
    from ..checkpoints.folded import load_tokenizer

    texts = data.text_units(m.data, m.limit) if m.data is not None else data.pydoc_paragraphs()
    return ev.speed(model, load_tokenizer(m.model_path), texts)


def _lm_eval_names(m: Measurement) -> list[str]:
    from . import lm_eval_tasks

    return [t.strip() for t in m.tasks.split(",") if t.strip()] if m.tasks else list(lm_eval_tasks.shipped_tasks())


def _check_lm_eval(m: Measurement) -> None:
    from . import lm_eval_tasks

    lm_eval_tasks.check_tasks(_lm_eval_names(m), m.data)


def _lm_eval(model, m: Measurement) -> dict:
    from . import lm_eval_tasks
    from ..checkpoints.folded import load_tokenizer

    return lm_eval_tasks.evaluate(model, load_tokenizer(m.model_path), _lm_eval_names(m), Path(m.data), limit=m.limit)


register_task(EvalTask("ppl", "perplexity of a causal LM on a text file", _perplexity, needs_data=True, causal=True,
                       check=_text_readable))  # fmt: skip
register_task(EvalTask("sts", "STS-B Spearman x100 of a sentence encoder (mean pooling)", _sts, needs_data=True,
                       causal=False, check=_check_sts))  # fmt: skip
register_task(EvalTask("fidelity", "closeness to --reference (next-token KL and top-1 agreement, or embedding "
                       "cosine)", _fidelity, needs_data=True, needs_reference=True, check=_text_readable))  # fmt: skip
register_task(EvalTask("size", "parameters, bytes on disk and peak memory to load", _size, check=_text_readable))
register_task(EvalTask("speed", "sentences per second (encoders) or greedy-decode tokens per second (decoders)",
                       _speed, check=_text_readable))  # fmt: skip
register_task(EvalTask("lm-eval", "zero-shot accuracy on local lm-evaluation-harness tasks", _lm_eval,
                       causal=True, check=_check_lm_eval, takes_tasks=True))  # fmt: skip
