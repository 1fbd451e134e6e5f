"""lm-evaluation-harness on local files: the task definitions shipped here (GLUE SST-2 dev and RTE dev, zero-shot,
log-likelihood of the label words) read their data from a folder laid out as GLUE is (``SST-2/dev.tsv``,
``RTE/dev.tsv``), because lm-eval's own tasks download from the Hub. Needs the ``lm-eval`` extra.

Each ``*.yaml`` here names its data file relative to that folder as ``"{SST-2/dev.tsv}"``; ``evaluate`` writes
the definitions with the real paths into a temporary folder and hands it to lm-eval's ``TaskManager``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from torch import nn

from ...core.errors import LayerfoldError

TASK_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r'"\{([^{}"]+)\}"')


def shipped_tasks() -> dict[str, Path]:
    return {path.stem: path for path in sorted(TASK_DIR.glob("*.yaml"))}


def data_files(task: str) -> list[str]:
    """The files (relative to the data folder) that a shipped task reads."""
    return _PLACEHOLDER.findall(shipped_tasks()[task].read_text(encoding="utf-8"))


def check_tasks(names: list[str], data: Path | None) -> None:
    """Every task is one of ours and its files are in ``data``: one line otherwise, before a model loads."""
    known = shipped_tasks()
    for name in names:
        if name not in known:
            raise LayerfoldError(f"unknown lm-eval task '{name}' (local tasks: {', '.join(known)})")
    if data is None:
        raise LayerfoldError("task lm-eval needs --data DIR: a folder laid out as GLUE (SST-2/dev.tsv, RTE/dev.tsv)")
    for name in names:
        for relative in data_files(name):
            if not (Path(data) / relative).is_file():
                raise LayerfoldError(f"{data}: no {relative} (needed by {name})")


def _effective(count) -> int:
    return count["effective"] if isinstance(count, dict) else count.effective


def evaluate(
    model: nn.Module, tokenizer, names: list[str], data: Path, *, limit: int | None = None, batch_size: int = 16
) -> dict:
    """Zero-shot accuracy on each task by lm-eval's Python API (``simple_evaluate`` over an ``HFLM`` that wraps
    the model in memory, folded or not)."""
    check_tasks(names, data)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LayerfoldError("task lm-eval needs lm-evaluation-harness: pip install 'layerfold[lm-eval]'") from None
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            text = shipped_tasks()[name].read_text(encoding="utf-8")
            text = _PLACEHOLDER.sub(lambda m: f'"{(Path(data) / m.group(1)).resolve()}"', text)
            (Path(folder) / f"{name}.yaml").write_text(text, encoding="utf-8")
        # The log-likelihood's first context token: lm-eval takes BOS, else EOS; a tokenizer with neither (a BERT
        # vocabulary on a decoder) gets its CLS or pad token rather than failing inside lm-eval.
        prefix = None
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            prefix = next((t for t in (tokenizer.cls_token_id, tokenizer.pad_token_id) if t is not None), None)
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix)
        output = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=TaskManager(include_path=folder, include_defaults=False),
            log_samples=False,
            bootstrap_iters=0,
        )
    accuracies = {name: output["results"][name]["acc,none"] for name in names}
    counts = {name: _effective(output["n-samples"][name]) for name in names}
    return {
        "task": "lm-eval",
        "metric": "accuracy",
        "value": sum(accuracies.values()) / len(accuracies),
        "accuracies": accuracies,
        "examples": counts,
        "settings": {"tasks": names, "num_fewshot": 0, "limit": limit, "lm_eval": lm_eval.__version__},
    }
