"""Relaxed Recursive Transformers' relaxation: a per-layer LoRA initialised from the truncated SVD of
(original - shared), so that at full rank the layer is exactly the original again."""

from __future__ import annotations

import torch

# A full-rank relaxation of a matrix below this many elements is computed in float64, which keeps it exact to
# ~1e-7; truncated ones only need float32 (and run several times faster).
_FLOAT64_LIMIT = 1 << 24


def resolve_rank(rank: int | str, shape: tuple[int, int]) -> int:
    return min(shape) if rank == "full" else int(rank)


def lora_from_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (A: r×in, B: out×r) with B @ A ≈ delta (out×in), singular values split evenly."""
    exact = rank >= min(delta.shape) and delta.numel() <= _FLOAT64_LIMIT
    work = delta.double() if exact else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s[:rank].sqrt()
    lora_b = u[:, :rank] * root
    lora_a = root[:, None] * vh[:rank]
    return lora_a.to(delta.dtype).contiguous(), lora_b.to(delta.dtype).contiguous()
