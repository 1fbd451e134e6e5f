"""SVFit (Sun et al., 2024): a position's relaxation is a fixed truncated SVD of its residual, U diag(s) V, and
healing trains the singular values s only (``--train relax``); at full rank it is the original again. It
stores as much as a LoRA of the same rank (plus r values) and trains r parameters per projection."""

from __future__ import annotations

import torch

from .base import Form, whitened_svd


class SvFit(Form):
    name = "svfit"
    summary = "a fixed SVD whose singular values train"
    trainable = ("svfit_s",)

    def layer_shapes(self, rank: int, out_features: int, in_features: int):
        return {"svfit_u": (out_features, rank), "svfit_s": (rank,), "svfit_v": (rank, in_features)}

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        return ((x @ module.svfit_v.T) * module.svfit_s) @ module.svfit_u.T

    def weight(self, module) -> torch.Tensor:
        return (module.svfit_u * module.svfit_s) @ module.svfit_v

    def fit(self, residuals, grams, rank, seed):
        """The truncated SVD of each residual in the space whitened by its inputs (U orthonormal, V = Ṽᵀ S⁻¹)."""
        layers = {}
        for i, delta in residuals.items():
            u, s, v = whitened_svd(delta, grams[i], rank, f"svfit relaxation of layer {i}")
            layers[i] = {"svfit_u": u, "svfit_s": s, "svfit_v": v}
        return {}, layers
