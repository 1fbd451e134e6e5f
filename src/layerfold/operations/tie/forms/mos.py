"""MoS (Mixture of Shards, Wang et al., ICLR 2025) over a tie group: the group's positions share two pools of
low-rank vectors, one for the input side (rows, ``mos_pool_a``: P × in) and one for the output side (columns,
``mos_pool_b``: out × P), stored once. The pools are cut into shards of ``shard`` vectors (vector sharding:
a shard is a slice of rows or columns, not a whole matrix); each position builds its own A (r × in) and
B (out × r) by concatenating r / shard shards of each pool picked by its index maps (``mos_index_a``,
``mos_index_b``: subset selection, and pair dissociation — the two maps are chosen apart), and adds
B · C · A with a small core C (r × r) of its own; ``private`` adds a private LoRA per position (shard
privatisation). Each side holds at most its dimension of vectors (a pool or a rank above it is cut to it).

Where it departs from MoS: MoS trains a pool from random and draws its index maps at random; here the maps
and a core are fitted to each position's residual (MoS has no core: the core is what lets a fixed pool be fitted
in closed form), and a pool serves one tie group (MoS's spans every layer). Initialised data-aware: the input
pool is the basis of the group's stacked residuals whitened by their summed inputs' Gram matrix (Basis
Sharing), the output pool the left singular vectors of the residuals whitened by their own inputs; each
position takes the shards that carry most of its own residual's energy, and its core is the exact
least-squares fit of its outputs given them. With pools and rank as large as the matrix the fit is exact."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....core.errors import LayerfoldError
from ....core.settings import setting
from .base import Form, whitened_svd
from ...factor.decompose import whitening_factor

# A pool holds this many times the rank unless the tie says otherwise (``pool``). One: every position reads the
# whole pool. Chosen on STS-B dev (all-MiniLM-L6-v2, half the block parameters, training-free): the whole pool
# 82.74, twice the rank (each position picks half the shards) 74.54, four times 70.83; private LoRA 82.90.
POOL_FACTOR = 1

# The core's fit adds this fraction of the mean input energy times the weight error to its objective: where
# some input directions carry no calibration energy it keeps the solve well posed, and a pool that spans the
# input space still reproduces the residual exactly.
OWN_DAMPING = 1e-4


def mos_sizes(rank: int, pool: int, shard: int, out_features: int, in_features: int) -> dict[str, int]:
    """The vectors each side holds: ``pool_in``/``pool_out`` in the pools, ``rank_in``/``rank_out`` per position
    (each cut to its side's dimension, in whole shards), and the shard size."""
    shard = shard or 1
    pool = pool or POOL_FACTOR * rank

    def whole(vectors: int, dim: int) -> int:
        return max(shard, min(vectors, dim) // shard * shard)

    return {"shard": shard, "pool_in": whole(pool, in_features), "pool_out": whole(pool, out_features),
            "rank_in": whole(rank, in_features), "rank_out": whole(rank, out_features)}  # fmt: skip


def shard_rows(index: torch.Tensor, shard: int) -> torch.Tensor:
    """The pool vectors (rows of A's pool, columns of B's) that a position's shard index map names, in order."""
    offsets = torch.arange(shard, device=index.device, dtype=index.dtype)
    return (index[:, None] * shard + offsets).reshape(-1)


def _padded(pool: torch.Tensor, vectors: int, dim: int) -> torch.Tensor:
    """The pool with zero vectors added up to ``vectors`` along ``dim``: a group's residuals can span fewer
    directions than the pool holds, and the unused vectors cost nothing to the fit."""
    missing = vectors - pool.shape[dim]
    if missing <= 0:
        return pool
    shape = list(pool.shape)
    shape[dim] = missing
    return torch.cat([pool, pool.new_zeros(shape)], dim)


def own_factor(delta: torch.Tensor, pool: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """The factor C (out × r) for fixed input-side vectors A (r × in) that minimises ‖(Δ − C A) S‖² +
    λ‖Δ − C A‖², i.e. C = Δ (G + λI) Aᵀ (A (G + λI) Aᵀ)⁻¹."""
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


def _chosen(energy: torch.Tensor, shard: int, count: int) -> torch.Tensor:
    """The ``count`` shards with the most energy (per pool vector, summed over each shard), in pool order."""
    per_shard = energy.reshape(-1, shard).sum(1)
    return torch.sort(torch.topk(per_shard, count, sorted=False).indices).values


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.pow(2).mean().sqrt())


@dataclass(kw_only=True)
class MosOptions:
    """MoS's options (0: the default)."""

    private: int = setting(0, help="With --relax mos: each layer's private LoRA rank beside the pool.", minimum=0)
    mos_pool: int = setting(0, help="With --relax mos: the vectors each of a group's two pools holds, at least "
                            "--rank.", minimum=1, default_text="--rank, the whole pool")  # fmt: skip
    mos_shard: int = setting(0, help="With --relax mos: the vectors in one shard, the unit an index map picks (it "
                             "must divide --rank and --mos-pool).", minimum=1, default_text="1")  # fmt: skip


class Mos(Form):
    name = "mos"
    summary = ("pools of vectors each group shares; each layer reads --rank of each by its index maps, through its "
               "own rank x rank core")  # fmt: skip
    Options = MosOptions
    trainable = ("mos_core", "mos_private_a", "mos_private_b")
    integer = ("mos_index_a", "mos_index_b")  # stored, never trained

    def __init__(self, options: MosOptions | None = None) -> None:
        super().__init__(options)
        self.private, self.pool, self.shard = self.options.private, self.options.mos_pool, self.options.mos_shard

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(out_features, in_features)

    def full_rank(self, shape: tuple[int, int]) -> int:
        return max(shape)

    def describe(self) -> str:
        private = f", private rank {self.private}" if self.private else ""
        pool = f", MoS pool {self.pool or 'of the rank'}, shards of {self.shard or 1}" if (self.pool, self.shard) != (0, 0) else ""
        return private + pool

    def check(self, rank: int, shape: tuple[int, int], where: str) -> None:
        out_features, in_features = shape
        pool, private = self.pool, self.private
        largest = max(shape)  # with pools as large as both sides and a core to match, the fit is exact
        if not 1 <= rank <= largest:
            raise LayerfoldError(f"{where}: a mos relaxation needs a rank of 1 to {largest} pool vectors per position "
                                 f"for a {out_features}x{in_features} projection, got {rank}")  # fmt: skip
        size = self.shard or 1
        if rank % size or (pool and pool % size):
            what = f"rank {rank}" if rank % size else f"pool of {pool} vectors"
            raise LayerfoldError(f"{where}: mos shards of {size} vectors do not divide the {what} (--mos-shard must "
                                 f"divide --rank and --mos-pool)")  # fmt: skip
        if size > min(shape):
            raise LayerfoldError(f"{where}: mos shards of {size} vectors are longer than a {out_features}x"
                                 f"{in_features} projection's side (at most {min(shape)})")  # fmt: skip
        if pool > largest:
            raise LayerfoldError(f"{where}: a mos pool of {pool} vectors is larger than a {out_features}x{in_features} "
                                 f"projection can use (--mos-pool at most {largest})")  # fmt: skip
        if pool and pool < rank:
            raise LayerfoldError(f"{where}: a mos pool of {pool} vectors is too small for the {rank} each position "
                                 f"reads (--mos-pool at least --rank)")  # fmt: skip
        if private > min(shape):
            raise LayerfoldError(f"{where}: private rank {private} is out of range for a {out_features}x"
                                 f"{in_features} projection (at most {min(shape)})")  # fmt: skip

    def sizes(self, rank: int, out_features: int, in_features: int) -> dict[str, int]:
        return mos_sizes(rank, self.pool, self.shard, out_features, in_features)

    def layer_shapes(self, rank: int, out_features: int, in_features: int):
        size = self.sizes(rank, out_features, in_features)
        shard = size["shard"]
        shapes = {"mos_core": (size["rank_out"], size["rank_in"]), "mos_index_a": (size["rank_in"] // shard,),
                  "mos_index_b": (size["rank_out"] // shard,)}
        if self.private:
            shapes.update(mos_private_a=(self.private, in_features), mos_private_b=(out_features, self.private))
        return shapes

    def pool_shapes(self, rank: int, out_features: int, in_features: int):
        size = self.sizes(rank, out_features, in_features)
        return {"mos_pool_a": (size["pool_in"], in_features), "mos_pool_b": (out_features, size["pool_out"])}

    def _factors(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """The position's A (r × in) and B (out × r), gathered from the pools by its index maps."""
        shard = self.shard or 1  # as ``mos_sizes`` says; no sizes on every forward
        a = module.shared.mos_pool_a.index_select(0, shard_rows(module.mos_index_a, shard))
        b = module.shared.mos_pool_b.index_select(1, shard_rows(module.mos_index_b, shard))
        return a, b

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        a, b = self._factors(module)
        y = ((x @ a.T) @ module.mos_core.T) @ b.T
        if self.private:
            y = y + (x @ module.mos_private_a.T) @ module.mos_private_b.T
        return y

    def weight(self, module) -> torch.Tensor:
        a, b = self._factors(module)
        weight = b @ module.mos_core @ a
        if self.private:
            weight = weight + module.mos_private_b @ module.mos_private_a
        return weight

    def fit(self, residuals, grams, rank, seed):
        """The pools from the group's residuals Δᵢ (see the module's docstring); then per position the shards that
        hold most of its whitened residual — output side: ‖uₖᵀ Δᵢ Sᵢ‖² for each pool column uₖ (orthonormal);
        input side: ‖Δᵢ Gᵢ aₖᵀ‖² / aₖ Gᵢ aₖᵀ for each pool row aₖ — and its core C = Bᵢᵀ Δᵢ M Aᵢᵀ (Aᵢ M Aᵢᵀ)⁻¹
        (M = Gᵢ + λI; Bᵢ's columns are orthonormal, so this is the exact minimiser). Then the private part: the
        whitened truncated SVD of what is left of each residual. Last, the pools and cores are rescaled so that
        all three have the same RMS (the products are unchanged): Adam takes steps of about one size, and
        unbalanced factors wreck the small one when healing."""
        layers = sorted(residuals)
        out_features, in_features = residuals[layers[0]].shape
        size = self.sizes(rank, out_features, in_features)
        shard = size["shard"]
        whitened = {i: residuals[i] if grams[i] is None else residuals[i] @ whitening_factor(grams[i], f"mos pool, "
                    f"layer {i}") for i in layers}  # fmt: skip
        left = torch.linalg.svd(torch.cat([whitened[i] for i in layers], 1), full_matrices=False)[0]
        pool_b = _padded(left[:, : size["pool_out"]], size["pool_out"], 1)
        summed = None if grams[layers[0]] is None else sum(grams[i] for i in layers)
        basis = whitened_svd(torch.cat([residuals[i] for i in layers]), summed, size["pool_in"], "mos pool")[2]
        pool_a = _padded(basis, size["pool_in"], 0)
        fitted = {}
        for i in layers:
            delta, gram = residuals[i], grams[i]
            energy_b = (pool_b.T @ whitened[i]).pow(2).sum(1)
            metric = gram if gram is not None else torch.eye(in_features, dtype=delta.dtype)
            norms = ((pool_a @ metric) * pool_a).sum(1)
            energy_a = (delta @ metric @ pool_a.T).pow(2).sum(0) / norms.clamp_min(1e-300)
            index_a = _chosen(energy_a, shard, size["rank_in"] // shard)
            index_b = _chosen(energy_b, shard, size["rank_out"] // shard)
            a = pool_a[shard_rows(index_a, shard)]
            b = pool_b[:, shard_rows(index_b, shard)]
            core = b.T @ own_factor(delta, a, gram)
            fitted[i] = {"mos_core": core, "mos_index_a": index_a, "mos_index_b": index_b}
            if self.private:
                rest = delta - b @ core @ a
                u, s, v = whitened_svd(rest, gram, self.private, f"mos private part of layer {i}")
                root = s.sqrt()
                fitted[i].update(mos_private_a=root[:, None] * v, mos_private_b=u * root)
        core_rms = sum(_rms(fitted[i]["mos_core"]) for i in layers) / len(layers)
        rms_a, rms_b = _rms(pool_a), _rms(pool_b)
        if min(core_rms, rms_a, rms_b) > 0:
            target = (core_rms * rms_a * rms_b) ** (1 / 3)
            scale_a, scale_b = target / rms_a, target / rms_b
            pool_a, pool_b = pool_a * scale_a, pool_b * scale_b
            for i in layers:
                fitted[i]["mos_core"] = fitted[i]["mos_core"] / (scale_a * scale_b)
        return {"mos_pool_a": pool_a, "mos_pool_b": pool_b}, fitted
