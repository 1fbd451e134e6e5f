"""Relaxed Recursive Transformers' relaxation: a per-layer LoRA initialised from the truncated SVD of
(original - shared), so that at full rank the layer is exactly the original again."""

from __future__ import annotations

import torch

# A full-rank relaxation of a matrix below this many elements is computed in float64, which keeps it exact to
# ~1e-7; truncated ones only need float32 (and run several times faster).
_FLOAT64_LIMIT = 1 << 24
# A full SVD of a 4096 × 11008 matrix takes ~40 s on two cores; a rank-64 relaxation of it does not need one.
# Below this side length, or at ranks above a quarter of it, the exact SVD is used (every model benchmarked
# in-memory here is below it, so their relaxations are exact truncations).
_RANDOMIZED_MIN_SIDE = 1024
_OVERSAMPLE = 16
_POWER_ITERATIONS = 4


def resolve_rank(rank: int | str, shape: tuple[int, int]) -> int:
    return min(shape) if rank == "full" else int(rank)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets: exact, or for a large matrix and a small rank by randomized
    subspace iteration (Halko et al. 2011) with a fixed seed, so that the same matrix always gives the same
    factors."""
    side = min(matrix.shape)
    if side < _RANDOMIZED_MIN_SIDE or 4 * rank > side:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(matrix.shape[1], rank + _OVERSAMPLE, generator=generator, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def lora_from_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (A: r×in, B: out×r) with B @ A ≈ delta (out×in), singular values split evenly."""
    exact = rank >= min(delta.shape) and delta.numel() <= _FLOAT64_LIMIT
    work = delta.double() if exact else delta.float()
    u, s, vh = truncated_svd(work, rank)
    root = s.sqrt()
    lora_b = u * root
    lora_a = root[:, None] * vh
    return lora_a.to(delta.dtype).contiguous(), lora_b.to(delta.dtype).contiguous()
