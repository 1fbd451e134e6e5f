"""VeRA (Kopiczko et al., ICLR 2024): every tied position of every projection of one shape reads the same frozen
random bases A (r × in) and B (out × r); a position keeps two vectors only, d (r) and b (out), and adds
diag(b) · B · diag(d) · A to its weight. The bases are made again from the plan's seed and the shape
(``bases``): the checkpoint does not store them, and they count as no parameters."""

from __future__ import annotations

import functools

import torch

from ....core.errors import LayerfoldError
from .base import Form, inner

FIT_ROUNDS = 30  # alternating least-squares rounds of the data-aware fit (each is closed form)


@functools.lru_cache(maxsize=64)
def bases(seed: int, rank: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen random bases for ``seed`` and a shape, the same in every process: A ~ N(0, 1/in) (r × in) and
    B ~ N(0, 1/r) (out × r), drawn in float64 on the CPU from a generator seeded with ``seed`` (VeRA draws
    Kaiming-uniform; a scaled normal is as random and its scale is the same)."""
    generator = torch.Generator().manual_seed(int(seed))
    a = torch.randn(rank, in_features, generator=generator, dtype=torch.float64) / in_features**0.5
    b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) / rank**0.5
    return a, b


def _bases_like(module, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = bases(module.seed, module.form_rank, module.out_features, module.in_features)
    return a.to(reference.device, reference.dtype), b.to(reference.device, reference.dtype)


class Vera(Form):
    name = "vera"
    summary = "shared frozen random bases, two vectors per layer; --rank is the bases'"
    trainable = ("vera_d", "vera_b")
    regenerated = "VeRA's random bases A and B (from the plan's seed and each projection's shape)"

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(out_features, in_features)  # more random directions than the matrix has add little

    def check(self, rank: int, shape: tuple[int, int], where: str) -> None:
        if not 1 <= rank <= max(shape):  # more random directions than the matrix has add little
            raise LayerfoldError(f"{where}: a vera relaxation needs a rank (its bases') of 1 to {max(shape)} for a "
                                 f"{shape[0]}x{shape[1]} projection, got {rank}")  # fmt: skip

    def layer_shapes(self, rank: int, out_features: int, in_features: int):
        return {"vera_d": (rank,), "vera_b": (out_features,)}

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        a, b = _bases_like(module, module.vera_d)
        return (((x @ a.T) * module.vera_d) @ b.T) * module.vera_b

    def weight(self, module) -> torch.Tensor:
        a, b = _bases_like(module, module.vera_d)
        return (module.vera_b[:, None] * b) @ (module.vera_d[:, None] * a)

    def fit(self, residuals, grams, rank, seed):
        """Each position's d and b minimise ‖(Δ − diag(b) B diag(d) A) S‖ (S Sᵀ its inputs' Gram matrix) by
        alternating least squares: for fixed d each b_j is a one-dimensional fit of row j; for fixed b, d
        solves the r × r normal equations ((UᵀU) ∘ (A G Aᵀ)) d = diag(Uᵀ Δ G Aᵀ) with U = diag(b) B."""
        layers = {}
        for i, delta in residuals.items():
            gram = grams[i]
            out_features, in_features = delta.shape
            a, b = bases(seed, rank, out_features, in_features)
            scale = float(gram.diagonal().mean()) if gram is not None else 1.0
            ridge = 1e-9 * scale
            a_gram_a = inner(a, a, gram)  # r × r
            delta_g_at = inner(delta, a, gram)  # out × r
            d = torch.ones(rank, dtype=torch.float64)
            v = torch.zeros(out_features, dtype=torch.float64)
            for _ in range(FIT_ROUNDS):
                # rows R_j = B_j diag(d) A: ⟨Δ_j, R_j⟩_G = Σ_k B_jk d_k (ΔGAᵀ)_jk; ‖R_j‖²_G = (B diag d) AGAᵀ (…)ᵀ
                bd = b * d
                numerator = (bd * delta_g_at).sum(1)
                denominator = ((bd @ a_gram_a) * bd).sum(1)
                v = numerator / (denominator + ridge)
                u = v[:, None] * b
                normal = (u.T @ u) * a_gram_a
                normal.diagonal().add_(ridge)
                d = torch.linalg.solve(normal, (u * delta_g_at).sum(0))
            layers[i] = {"vera_d": d, "vera_b": v}
        return {}, layers
