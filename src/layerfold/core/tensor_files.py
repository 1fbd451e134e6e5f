"""Safetensors checkpoints on disk, a tensor at a time.

``SourceCheckpoint`` reads an original Hugging Face checkpoint folder, one file (``model.safetensors``) or
shards listed in ``model.safetensors.index.json``, checking every shard and header before any work starts.
Each ``read`` returns tensors backed by the shards' memory mappings: their pages are read on first use and
leave resident memory when the tensors are freed, so a checkpoint larger than memory is never resident.

``ShardWriter`` writes a folded model's tensors as they come, straight to their place in shards of at most
``max_shard_bytes`` named as Hugging Face names them (``model-00001-of-00003.safetensors`` and an index), or
one ``model.safetensors`` when everything fits in one shard. The in-memory save uses it too, so both write
the same format.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import LayerfoldError, first_line

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'1GB', '500MB', '2GiB' or a number of bytes (``flag`` names the option in errors)."""
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
    except (ValueError, OverflowError):
        raise LayerfoldError(f"{flag}: not a size: {text!r} (e.g. 1GB, 500MB)") from None
    if value < 1:
        raise LayerfoldError(f"{flag} must be positive, got {text!r}")
    return value


def _index_data(index: Path) -> dict:
    """A safetensors index file, checked: JSON with a map of tensor names to file names."""
    inside(index.parent, index)
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a map of tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise LayerfoldError(f"{index}: not a readable safetensors index ({err})") from None
    return data


def _read_index(index: Path) -> dict[str, str]:
    return _index_data(index)["weight_map"]


def _shard_path(folder: Path, name: str, index: Path) -> Path:
    """A shard named by an index: a plain file name inside the checkpoint folder, nothing else."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise LayerfoldError(f"{index}: shard {name!r} is not a file inside {folder}")
    return inside(folder, folder / name)


def _cache_root(folder: Path) -> Path:
    """Where a checkpoint folder's files may resolve to: the folder itself, or for a snapshot of the Hugging Face
    cache (``models--owner--name/snapshots/<revision>/``, every file a link into ``../../blobs``) the repository's
    cache folder."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def inside(folder: Path, path: Path) -> Path:
    """``path`` (a file of ``folder``), refused in one line when it resolves outside the folder (or outside its
    Hub cache repository: ``_cache_root``), e.g. a link to a file elsewhere on disk."""
    if path.exists() and not path.resolve().is_relative_to(_cache_root(folder)):
        raise LayerfoldError(f"{path} links to {path.resolve()}, outside the checkpoint folder {folder}; not read")
    return path


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards or the single file."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        index = folder / INDEX_NAME
        return [_shard_path(folder, name, index) for name in dict.fromkeys(_read_index(index).values())]
    return [inside(folder, folder / SINGLE_NAME)]


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
        for name in files:
            _shard_path(self.folder, name, self.folder / INDEX_NAME if listed is not None else self.folder)
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
            except (SafetensorError, OSError, ValueError, OverflowError) as err:
                raise LayerfoldError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None
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
                        # Backed by the file's mapping (no copy); its pages leave memory with the tensor.
                        tensors[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as err:
                raise LayerfoldError(f"{self.folder / shard}: cannot read {wanted[0]} ({err})") from None
        return tensors


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


class ShardWriter:
    """Writes tensors whose names, shapes and dtypes are known in advance straight to their place in
    safetensors shards, in any order: each shard's header is laid out first, each tensor is written at its
    offset when it arrives, nothing is buffered. Shards hold consecutive ``specs`` up to ``max_shard_bytes``
    and are named as transformers names them (one file: ``model.safetensors``; more: ``model-00001-of-00003``
    and ``model.safetensors.index.json``). The safetensors library only writes whole files at once."""

    def __init__(
        self,
        folder: str | Path,
        specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in specs:
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and used + size > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, size))
            used += size
        count = len(shards)
        self.files = (
            [SINGLE_NAME] if count == 1 else [f"model-{n + 1:05d}-of-{count:05d}.safetensors" for n in range(count)]
        )
        self.place: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}  # name -> shard, offset, ...
        self.headers: list[bytes] = []
        self.remaining: list[set[str]] = []
        self.total_bytes = 0
        for n, shard in enumerate(shards):
            header: dict = {"__metadata__": self.metadata}
            offset = 0
            for name, shape, dtype, size in shard:
                header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                self.place[name] = (n, offset, shape, dtype)
                offset += size
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            self.headers.append(len(encoded).to_bytes(8, "little") + encoded)
            self.remaining.append({name for name, *_ in shard})
            self.total_bytes += offset
        self.handles: dict[int, object] = {}

    @property
    def shard_count(self) -> int:
        return len(self.files)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.place:
            raise LayerfoldError(f"internal error: {name} is not in the checkpoint's layout")
        n, offset, shape, dtype = self.place[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise LayerfoldError(
                f"internal error: {name} is {tuple(tensor.shape)} {tensor.dtype}, its layout says {shape} {dtype}"
            )
        if n not in self.handles:
            handle = open(self.folder / self.files[n], "wb")
            handle.write(self.headers[n])
            self.handles[n] = handle
        handle = self.handles[n]
        handle.seek(len(self.headers[n]) + offset)
        if tensor.numel():
            handle.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
        self.remaining[n].discard(name)
        if not self.remaining[n]:
            handle.close()
            del self.handles[n]

    def finish(self) -> list[Path]:
        for n, remaining in enumerate(self.remaining):
            if remaining:
                raise LayerfoldError(f"internal error: {sorted(remaining)[0]} was never written")
            if not (self.folder / self.files[n]).exists():  # a shard of no tensors (an empty model)
                (self.folder / self.files[n]).write_bytes(self.headers[n])
        if len(self.files) > 1:
            weight_map = {name: self.files[n] for name, (n, *_) in self.place.items()}
            index = {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in self.files]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def write_tensors(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write a dict of tensors as one safetensors file or shards with an index."""
    writer = ShardWriter(
        folder,
        [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()],
        max_shard_bytes=max_shard_bytes,
        metadata=metadata,
    )
    try:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.finish()
    finally:
        writer.close()


def read_metadata(folder: str | Path) -> dict[str, str]:
    """The metadata a checkpoint was written with (from the index, or the single file's header)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        metadata = _index_data(folder / INDEX_NAME).get("metadata", {})
        if not isinstance(metadata, dict):
            raise LayerfoldError(f"{folder / INDEX_NAME}: its metadata is not a mapping")
        return metadata
    try:
        with safe_open(folder / SINGLE_NAME, framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LayerfoldError(f"{folder / SINGLE_NAME}: not a readable safetensors file ({first_line(err)})") from None


def stored_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape, read from the headers only (no data), each file checked against its size
    (``SourceCheckpoint``): a truncated, corrupt or oversized file fails here with one line."""
    return SourceCheckpoint(folder).shapes


def load_all(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in weight_files(folder):
        try:
            tensors.update(load_file(shard))
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
            raise LayerfoldError(f"{shard}: not a readable safetensors file ({first_line(err)})") from None
    return tensors
