"""A pool shared by a tie group's positions, after MoS (Mixture of Shards, Wang et al., 2024). One factor of every
position's relaxation comes from a pool of ``rank`` vectors ("vector shards") that the group's positions share
and the checkpoint stores once; the other factor is the position's own. The pooled side is the projection's
larger one (its input side when in > out, else its output side), where sharing saves most, and ``private``
adds a small private LoRA per position (MoS's shard privatisation).

What is not MoS: every position reads the whole pool, so there is no index map and no subset selection, and
only one factor is pooled (no pair dissociation). Initialised data-aware: the pool is the joint whitened SVD of
the group's residuals and each position's own factor its exact least-squares fit given the pool."""

from __future__ import annotations

import torch

from .base import Form, whitened_svd
from ...factor.decompose import whitening_factor


def pooled_side(out_features: int, in_features: int) -> str:
    return "in" if in_features > out_features else "out"


def _padded(pool: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """The pool with zero vectors added up to ``rank`` along ``dim``: a group's residuals span fewer directions
    than a large pool holds (n·in < out), and the unused vectors cost nothing to the fit."""
    missing = rank - pool.shape[dim]
    if missing <= 0:
        return pool
    shape = list(pool.shape)
    shape[dim] = missing
    return torch.cat([pool, pool.new_zeros(shape)], dim)


def _balance(pool: torch.Tensor, own: list[torch.Tensor], side: str):
    """Rescale each pooled vector and the matching part of every position's factor so that both have the same
    RMS (the products are unchanged): Adam takes steps of about one size, and unbalanced factors wreck the small
    one when healing (as for Basis Sharing's factors)."""
    pool_axis, own_axis = (1, 0) if side == "in" else (0, 1)  # "in": pool r × in, own out × r
    pool_rms = pool.pow(2).mean(pool_axis)
    own_rms = torch.stack([o.pow(2).mean(own_axis) for o in own]).mean(0)
    scale = (own_rms / pool_rms.clamp_min(1e-300)).clamp_min(1e-300).pow(0.25)
    scale = torch.where((pool_rms > 0) & (own_rms > 0), scale, torch.ones_like(scale))  # padding stays zero
    if side == "in":
        return pool * scale[:, None], [o / scale for o in own]
    return pool * scale, [o / scale[:, None] for o in own]


# The input-side fit adds this fraction of the mean input energy times the weight error to its objective: where
# some input directions carry no calibration energy it keeps the solve well posed, and a pool that spans the
# input space still reproduces the residual exactly.
OWN_DAMPING = 1e-4


def own_factor(delta: torch.Tensor, pool: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """A position's own factor C (out × r) for a pooled input-side A (r × in): the minimiser of
    ‖(Δ − C A) S‖² + λ‖Δ − C A‖², i.e. C = Δ (G + λI) Aᵀ (A (G + λI) Aᵀ)⁻¹."""
    if gram is None:
        gram = torch.zeros(delta.shape[1], delta.shape[1], dtype=torch.float64)
        damping = 1.0
    else:
        damping = OWN_DAMPING * float(gram.diagonal().mean().clamp_min(1e-12))
    damped = gram.double().clone()
    damped.diagonal().add_(damping)
    normal = pool @ damped @ pool.T
    normal.diagonal().add_(1e-12 * float(normal.diagonal().mean().clamp_min(1e-300)))  # zero (padding) rows
    return torch.linalg.solve(normal, pool @ damped @ delta.T).T


class Mos(Form):
    name = "mos"
    trainable = ("mos_own", "mos_private_a", "mos_private_b")

    def __init__(self, private: int = 0) -> None:
        self.private = private

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(out_features, in_features)

    def layer_shapes(self, rank: int, out_features: int, in_features: int):
        own = (out_features, rank) if pooled_side(out_features, in_features) == "in" else (rank, in_features)
        shapes = {"mos_own": own}
        if self.private:
            shapes.update(mos_private_a=(self.private, in_features), mos_private_b=(out_features, self.private))
        return shapes

    def pool_shapes(self, rank: int, out_features: int, in_features: int):
        side = pooled_side(out_features, in_features)
        return {"mos_pool": (rank, in_features) if side == "in" else (out_features, rank)}

    def _pooled(self, module) -> torch.Tensor:
        pool, own = module.shared.mos_pool, module.mos_own
        return own @ pool if module.pooled_side == "in" else pool @ own

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        pool, own = module.shared.mos_pool, module.mos_own
        y = (x @ pool.T) @ own.T if module.pooled_side == "in" else (x @ own.T) @ pool.T
        if self.private:
            y = y + (x @ module.mos_private_a.T) @ module.mos_private_b.T
        return y

    def weight(self, module) -> torch.Tensor:
        weight = self._pooled(module)
        if self.private:
            weight = weight + module.mos_private_b @ module.mos_private_a
        return weight

    def fit(self, residuals, grams, rank, seed):
        """Output side pooled: the top ``rank`` left singular vectors U of [Δ₁S₁ … ΔₙSₙ] (Sᵢ Sᵢᵀ = Gᵢ), each
        position's own factor Uᵀ Δᵢ (exact given U). Input side pooled: the basis of the stacked [Δ₁; …; Δₙ]
        whitened by the summed Gram matrix (Basis Sharing), each position's own factor Δᵢ Gᵢ Aᵀ (A Gᵢ Aᵀ)⁻¹.
        Then the private part: the whitened truncated SVD of what is left of each residual."""
        layers = sorted(residuals)
        out_features, in_features = residuals[layers[0]].shape
        side = pooled_side(out_features, in_features)
        if side == "out":
            whitened = [residuals[i] if grams[i] is None else residuals[i] @ whitening_factor(grams[i], f"mos pool, "
                        f"layer {i}") for i in layers]  # fmt: skip
            pool = _padded(torch.linalg.svd(torch.cat(whitened, 1), full_matrices=False)[0][:, :rank], rank, 1)
            own = [pool.T @ residuals[i] for i in layers]
        else:
            summed = None if grams[layers[0]] is None else sum(grams[i] for i in layers)
            basis = whitened_svd(torch.cat([residuals[i] for i in layers]), summed, rank, "mos pool")[2]
            pool = _padded(basis, rank, 0)
            own = [own_factor(residuals[i], pool, grams[i]) for i in layers]
        pool, own = _balance(pool, own, side)
        fitted = {}
        for i, mine in zip(layers, own):
            fitted[i] = {"mos_own": mine}
            if self.private:
                left = residuals[i] - (mine @ pool if side == "in" else pool @ mine)
                u, s, v = whitened_svd(left, grams[i], self.private, f"mos private part of layer {i}")
                root = s.sqrt()
                fitted[i].update(mos_private_a=root[:, None] * v, mos_private_b=u * root)
        return {"mos_pool": pool}, fitted
