"""Reading evaluation and calibration text: plain text, WikiText raw, and STS-B pairs. Any path works."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import TypeVar, Union

from .errors import LayerfoldError, first_line

_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")

# What calibration and healing read: one data file (or folder), or a mix of several given as a list of Paths
# (`--calib A --calib B`, `--data A --data B`). A list of str is something else: texts, not files.
DataSource = Union[str, Path, Sequence[Path]]
_Item = TypeVar("_Item")


def is_mix(source) -> bool:
    """Whether ``source`` names data files (a list of Paths) rather than being one file or a list of texts."""
    return isinstance(source, (list, tuple)) and bool(source) and all(isinstance(p, Path) for p in source)


def source_paths(source: DataSource) -> list[Path]:
    """The files of a data source: one, or each of a mix."""
    return [Path(p) for p in source] if is_mix(source) else [Path(source)]  # type: ignore[arg-type]


def single_source(paths: Sequence[Path] | None) -> DataSource | None:
    """A repeated command-line option as a data source: nothing, the one file, or the mix."""
    if not paths:
        return None
    return Path(paths[0]) if len(paths) == 1 else [Path(p) for p in paths]


def describe_source(source: DataSource | None, *, resolve: bool = False) -> str | None:
    """The source as reports and provenance name it: a path, or the mix's paths joined by ' + '."""
    if source is None:
        return None
    return " + ".join(str(p.resolve() if resolve else p) for p in source_paths(source))


def check_source(source: DataSource) -> None:
    """Read every file of the source once: missing, empty or unreadable data fails before any slow work."""
    for path in source_paths(source):
        read_documents(path)


def interleave(parts: Sequence[Sequence[_Item]]) -> list[_Item]:
    """Round-robin over the parts (a mix's sources), so that any prefix of the result holds every domain."""
    return [item for item in chain.from_iterable(zip_longest(*parts, fillvalue=_GAP)) if item is not _GAP]


_GAP = object()


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with line ends normalised to ``\\n``; missing, empty or non-UTF-8 files are errors."""
    path = Path(path)
    if not path.is_file():
        raise LayerfoldError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LayerfoldError(f"data file is not UTF-8 text: {path} (byte {err.start})") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise LayerfoldError(f"data file is empty: {path}")
    return text


def wikitext_articles(text: str) -> list[str]:
    """Split WikiText raw text into articles at its top-level ` = Title = ` lines."""
    articles: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if _WIKITEXT_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(lines).strip("\n") for lines in articles if any(s.strip() for s in lines)]


def wikitext_half(path: str | Path, half: str) -> str:
    """The first or second half of a WikiText file, cut at its middle character. Benchmarks calibrate and heal
    on the first half and evaluate on the second, so the two never meet. (Cutting at the middle character,
    not at an article boundary, is the protocol of the reference figures the benchmarks compare against:
    SmolLM2-135M scores 22.89 on the first 4,096 tokens of this second half.)"""
    text = read_text(path)
    middle = len(text) // 2
    return {"first": text[:middle], "second": text[middle:]}[half]


@dataclass(frozen=True)
class SentencePair:
    score: float
    first: str
    second: str


def is_sts_file(path: str | Path) -> bool:
    """STS-B files are tab-separated with the score in column 5 and the two sentences in columns 6 and 7."""
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    cells = line.rstrip("\n").split("\t")
    if len(cells) < 7:
        return False
    try:
        float(cells[4])
    except ValueError:
        return False
    return True


def read_sts(path: str | Path, limit: int | None = None) -> list[SentencePair]:
    """STS-B pairs (no quoting: split on tabs, as the format needs)."""
    text = read_text(path)
    pairs = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        cells = line.split("\t")
        try:
            pairs.append(SentencePair(float(cells[4]), cells[5], cells[6]))
        except (IndexError, ValueError):
            raise LayerfoldError(
                f"{path}:{number}: not an STS-B line (score in column 5, sentences in columns 6 and 7)"
            ) from None
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def text_lines(text: str) -> list[str]:
    """The non-empty lines of a text, whitespace collapsed, without WikiText ` = Title = ` lines."""
    units = [" ".join(line.split()) for line in text.split("\n")]
    return [u for u in units if u and not _WIKITEXT_TITLE.match(" " + u + " ")]


def text_units(path: str | Path, limit: int | None = None) -> list[str]:
    """Short texts for sentence-level measures: STS-B sentences, or the non-empty lines of the other sources'
    documents (any format ``read_documents`` reads)."""
    texts, kind = read_documents(path)
    units = texts if kind == "sts" else [line for text in texts for line in text_lines(text)]
    if not units:
        raise LayerfoldError(f"{path}: no text found")
    return units[:limit] if limit else units


def read_documents(path: str | Path) -> tuple[list[str], str]:
    """The texts of a data source and its kind, for every command that reads text (calibration, heal, analysis,
    eval): a local HF ``datasets`` folder (``save_to_disk``), a ``.jsonl`` file of ``{"text": ...}`` objects (or
    strings), an STS-B file (its sentences, in order) or plain text / WikiText raw (one document)."""
    path = Path(path)
    if not path.exists():
        raise LayerfoldError(f"data file not found: {path}")
    if path.is_dir():
        return _dataset_folder_texts(path), "datasets"
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise LayerfoldError(f"{path}:{number}: not JSON ({err.msg})") from None
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise LayerfoldError(f"{path}:{number}: expected a string or an object with a 'text' string")
            texts.append(text)
        kind = "jsonl"
    elif is_sts_file(path):
        texts = [s for pair in read_sts(path) for s in (pair.first, pair.second)]
        kind = "sts"
    else:
        texts = [read_text(path)]
        kind = "text"
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LayerfoldError(f"{path}: no text found")
    return texts, kind


def _dataset_folder_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise LayerfoldError("reading a datasets folder needs the datasets package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets and pyarrow raise many kinds on a folder that is not a saved dataset
        raise LayerfoldError(f"{path}: not a datasets folder saved with save_to_disk ({first_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    columns = [name for name, feature in loaded.features.items() if getattr(feature, "dtype", None) == "string"]
    if not columns:
        raise LayerfoldError(f"{path}: the dataset has no text column")
    column = "text" if "text" in columns else columns[0]
    return [t for t in loaded[column] if isinstance(t, str)]


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
