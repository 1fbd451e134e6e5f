"""Reading evaluation and calibration text: plain text, WikiText raw, and STS-B pairs. Any path works."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LayerfoldError

_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


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
    """Short texts for sentence-level measures: STS-B sentences, or the non-empty paragraphs/lines of a text."""
    if is_sts_file(path):
        units = [s for pair in read_sts(path) for s in (pair.first, pair.second)]
    else:
        units = text_lines(read_text(path))
    if not units:
        raise LayerfoldError(f"{path}: no text found")
    return units[:limit] if limit else units


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
