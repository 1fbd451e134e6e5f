"""Counting what a model really stores (unique parameters, split by role, and bytes on disk), and ``Report``,
the typed result of a job with its Markdown."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .families import family_of
from .store import fold_state

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.device.type == "meta":
        return ("meta", id(tensor))
    return (tensor.device.type, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))


def unique_parameters(model: nn.Module) -> int:
    """Parameters counted once per stored tensor: tied weights and shared projections count once."""
    seen: dict[tuple, int] = {}
    for param in model.parameters():
        seen.setdefault(_storage_key(param), param.numel())
    return sum(seen.values())


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Unique parameters split into embeddings (input, position and output), transformer blocks (including
    shared weights) and other (final norms, pooler, heads)."""
    embedding_params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_params.extend(module.parameters(recurse=False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding_params.extend(output.parameters(recurse=False))
    block_params = list(family_of(model).layer_list(model).parameters())
    state = fold_state(model)
    if state is not None:
        block_params.extend(state.parameters())

    counted: set[tuple] = set()

    def count(params) -> int:
        total = 0
        for p in params:
            key = _storage_key(p)
            if key not in counted:
                counted.add(key)
                total += p.numel()
        return total

    embeddings = count(embedding_params)
    blocks = count(block_params)
    other = count(model.parameters())
    return {"embeddings": embeddings, "blocks": blocks, "other": other, "total": embeddings + blocks + other}


def weight_bytes(path: str | Path) -> int:
    """Bytes of weight files in a model folder (or of one weight file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def size_rows(before: dict, after: dict) -> list[list[str]]:
    """Rows comparing two size reports ({"parameters": breakdown, "bytes_on_disk": n})."""
    rows = []
    for key, label in (
        ("total", "unique parameters"),
        ("embeddings", "- embeddings"),
        ("blocks", "- blocks"),
        ("other", "- other"),
    ):
        b, a = before["parameters"][key], after["parameters"][key]
        ratio = f"{a / b:.1%}" if b else "-"
        rows.append([label, human_count(b), human_count(a), ratio])
    b, a = before.get("bytes_on_disk"), after.get("bytes_on_disk")
    if b and a:
        rows.append(["size on disk", human_bytes(b), human_bytes(a), f"{a / b:.1%}"])
    return rows


SIZE_HEADER = ["", "original", "folded", "kept"]


def size_table(before: dict, after: dict) -> str:
    return markdown_table(SIZE_HEADER, size_rows(before, after))


# ---- a job's result ------------------------------------------------------------------------------------------
class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()  # a report field left out of the JSON (e.g. a fold's budget, when it was by a plan)


def merged(**extra: Any) -> Any:
    """A report field whose keys are the report's own in the JSON (e.g. a measurement's metric-specific keys)."""
    return dataclasses.field(default_factory=dict, metadata={"merged": True, **extra})


class Report(Mapping):
    """The result of a job (a dataclass of its fields): ``to_dict`` is what ``--json`` prints, ``markdown`` what
    the command prints otherwise. It reads as a mapping too (``report["keep"]``), as the plain dicts of layerfold
    0.1 did, so scripts written against them keep working."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("merged"):
                out.update(value)
            elif value is not ABSENT and not f.metadata.get("hidden"):
                out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value  # a typed part (plan, size)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def markdown(self) -> str:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(eq=False)
class Size(Report):
    """A model's size: its unique parameters by role (``parameter_breakdown``) and, for a folder, the bytes of
    its weight files."""

    parameters: dict[str, int]
    bytes_on_disk: int | None = None

    def markdown(self) -> str:
        return markdown_table(["", "value"], [[k, human_count(v)] for k, v in self.parameters.items()])
