"""Safetensors checkpoints on disk, a tensor at a time.

``SourceCheckpoint`` reads an original Hugging Face checkpoint folder, one file (``model.safetensors``) or
shards listed in ``model.safetensors.index.json``, checking every shard and header before any work starts.
Each ``read`` memory-maps the shards it needs, copies the tensors out and closes them again, so the pages of a
checkpoint larger than memory never stay mapped (they would count as resident memory).

``ShardWriter`` writes a folded model's tensors as they come, in shards of at most ``max_shard_bytes``
named as Hugging Face names them (``model-00001-of-00003.safetensors`` and an index), or one
``model.safetensors`` when everything fits in one shard. The in-memory save uses it too, so both write the
same format.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import LayerfoldError

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB: a streamed fold holds one shard in memory before writing it


def parse_size(text: str | int) -> int:
    """'1GB', '500MB', '2GiB' or a number of bytes."""
    if isinstance(text, int):
        return text
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            break
    else:
        number, scale = lowered, 1
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise LayerfoldError(f"--max-shard-size: not a size: {text!r} (e.g. 1GB, 500MB)") from None
    if value < 1:
        raise LayerfoldError(f"--max-shard-size must be positive, got {text!r}")
    return value


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a map of tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise LayerfoldError(f"{index}: not a readable safetensors index ({err})") from None
    return weight_map


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards or the single file."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return [folder / name for name in dict.fromkeys(_read_index(folder / INDEX_NAME).values())]
    return [folder / SINGLE_NAME]


def has_weights(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()


class SourceCheckpoint:
    """The tensors of a safetensors checkpoint folder, by name, read on demand (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if (self.folder / INDEX_NAME).is_file():
            listed = _read_index(self.folder / INDEX_NAME)
            where = f"listed in {INDEX_NAME}"
        elif (self.folder / SINGLE_NAME).is_file():
            listed, where = None, ""
        else:
            raise LayerfoldError(
                f"no {SINGLE_NAME} or {INDEX_NAME} in {self.folder}: streamed folding reads safetensors checkpoints"
            )
        files = sorted(set(listed.values())) if listed is not None else [SINGLE_NAME]
        self.shard_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            shard = self.folder / name
            if not shard.is_file():
                raise LayerfoldError(f"checkpoint shard missing: {shard} ({where})")
            try:
                with safe_open(shard, framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self.shard_of[key] = name
                        self.shapes[key] = tuple(piece.get_shape())
                        self.dtypes[key] = piece.get_dtype()
            except (SafetensorError, OSError) as err:
                raise LayerfoldError(f"{shard}: not a readable safetensors file ({err})") from None
        if listed is not None:
            missing = [key for key, shard in listed.items() if self.shard_of.get(key) != shard]
            if missing:
                raise LayerfoldError(
                    f"{self.folder / listed[missing[0]]} lacks tensor {missing[0]} that {INDEX_NAME} lists there"
                )

    def names(self) -> list[str]:
        return list(self.shard_of)

    def nbytes(self) -> int:
        return sum(os.path.getsize(self.folder / name) for name in set(self.shard_of.values()))

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of their shards (each shard opened and closed once per call)."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in dict.fromkeys(names):
            if name not in self.shard_of:
                raise LayerfoldError(f"{self.folder}: the checkpoint has no tensor {name}")
            by_shard[self.shard_of[name]].append(name)
        tensors = {}
        for shard, wanted in by_shard.items():
            try:
                with safe_open(self.folder / shard, framework="pt") as handle:
                    for name in wanted:
                        tensors[name] = handle.get_tensor(name).clone()  # own memory, not the closed mapping's
            except (SafetensorError, OSError) as err:
                raise LayerfoldError(f"{self.folder / shard}: cannot read {wanted[0]} ({err})") from None
        return tensors


class ShardWriter:
    """Safetensors shards written as tensors arrive (see the module docstring). ``finish`` names them."""

    def __init__(self, folder: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata=None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.folder / f".shard-{len(self.shards)}.partial", metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self.flush()
        count = len(self.shards)
        if count <= 1:
            if count == 0:
                save_file({}, self.folder / ".shard-0.partial", metadata=self.metadata)
            os.replace(self.folder / ".shard-0.partial", self.folder / SINGLE_NAME)
            return [self.folder / SINGLE_NAME]
        names = [f"model-{n + 1:05d}-of-{count:05d}.safetensors" for n in range(count)]
        weight_map = {}
        for n, (name, tensors) in enumerate(zip(names, self.shards)):
            os.replace(self.folder / f".shard-{n}.partial", self.folder / name)
            weight_map.update({tensor: name for tensor in tensors})
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in names]


def read_metadata(folder: str | Path) -> dict[str, str]:
    """The metadata a checkpoint was written with (from the index, or the single file's header)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return json.loads((folder / INDEX_NAME).read_text(encoding="utf-8")).get("metadata", {})
    with safe_open(folder / SINGLE_NAME, framework="pt") as handle:
        return handle.metadata() or {}


def load_all(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in weight_files(folder):
        tensors.update(load_file(shard))
    return tensors
