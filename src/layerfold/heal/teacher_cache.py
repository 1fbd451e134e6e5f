"""An on-disk cache of the teacher's top-k next-token logits, so the teacher runs once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import LayerfoldError


def teacher_fingerprint(teacher_path: Path) -> str:
    """Identifies the teacher's weights by path, size and modification time of its files."""
    files = [teacher_path] if teacher_path.is_file() else sorted(p for p in teacher_path.iterdir() if p.is_file())
    return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


@torch.no_grad()
def teacher_top_k(
    teacher: nn.Module, examples: list[torch.Tensor], *, top_k: int, cache_dir: str | Path, fingerprint: str
) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """The teacher's top-k logits and token ids for every training window, from ``cache_dir`` when an earlier
    run over the same teacher and data left them there. Returns (values, indices, file, hit)."""
    from safetensors.torch import load_file, save_file

    ids = torch.stack(examples)
    digest = hashlib.sha256(fingerprint.encode() + str(top_k).encode() + ids.numpy().tobytes()).hexdigest()[:20]
    cache_dir = Path(cache_dir)
    file = cache_dir / f"teacher-top{top_k}-{digest}.safetensors"
    if file.is_file():
        tensors = load_file(file)
        return tensors["values"], tensors["indices"], file, True
    values = torch.empty((*ids.shape, top_k), dtype=torch.float32)
    indices = torch.empty((*ids.shape, top_k), dtype=torch.int32)
    teacher.eval()
    for row in tqdm(range(ids.shape[0]), desc="teacher top-k", unit="window"):
        logits = teacher(ids[row : row + 1]).logits[0].float()
        top = logits.topk(top_k, dim=-1)
        values[row], indices[row] = top.values, top.indices.to(torch.int32)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.partial")  # several processes may build it
        save_file({"values": values, "indices": indices}, tmp)
        os.replace(tmp, file)
    except OSError as err:
        raise LayerfoldError(f"cannot write the teacher cache in {cache_dir}: {err.strerror or err}") from None
    return values, indices, file, False
