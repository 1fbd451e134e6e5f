"""Kronecker relaxations after Compacter (Mahabadi et al., 2021): each tied position's relaxation is a sum of
Kronecker products Σₖ Aₖ ⊗ (sₖ tₖ), where the "slow" matrices Aₖ (n × n) are shared by the tie group (stored
once, in the shared projection) and the "fast" factors sₖ ((out/n) × r) and tₖ (r × (in/n)) are the position's
own, of rank r (Compacter's are of rank 1). ``terms`` slow matrices (Compacter: n of them) cost terms·n² once;
each position costs terms·r·(out + in)/n — with n terms, as much as a LoRA of rank r.

Fitted to the group's residuals Δᵢ = Wᵢ − W. The shared Aₖ come from the rearrangement of Van Loan and
Pitsianis: A ⊗ B is the rank-1 matrix vec(A) vec(B)ᵀ once Δ's (out/n) × (in/n) blocks are laid out as rows, so
the Aₖ are the top left singular vectors of the group's rearranged residuals side by side. Given them, each
position's fast factors are fitted to its outputs on its own calibration inputs: with x's n blocks as the rows
of X, (A ⊗ B) x is A X Bᵀ, so the full fast factors solve one damped least-squares problem of size terms·(in/n)
whose normal matrix and right-hand side come from the input Gram matrix alone; each is then truncated to rank r
in the space whitened by the inputs it sees (A X). Without Gram matrices the fit is in the plain norm (the exact
least-squares factors given the Aₖ, then their truncated SVD). With n² terms and full-rank fast factors it
reproduces every residual exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....core.errors import LayerfoldError
from ....core.settings import setting
from .base import Form, whitened_svd

# Kronecker's slow matrices are n × n with this n unless the tie says otherwise (Compacter: n = 4, of 2–12).
KRON_FACTOR = 4


def kron_sizes(factor: int, terms: int) -> tuple[int, int]:
    """A Kronecker relaxation's slow-matrix size n and number of slow matrices (0: the defaults, n and n)."""
    n = factor or KRON_FACTOR
    return n, terms or n


@dataclass(kw_only=True)
class KroneckerOptions:
    """Kronecker's options (0: the default)."""

    kron_factor: int = setting(0, help="With --relax kronecker: the shared slow matrices' size n (n x n; it must "
                               "divide both sides of every shared projection).", minimum=1,
                               default_text=str(KRON_FACTOR))  # fmt: skip
    kron_terms: int = setting(0, help="With --relax kronecker: how many slow matrices each tie group shares, 1 to "
                              "n² (with n² and --rank full the relaxation is exact).", minimum=1, default_text="n")  # fmt: skip

# The data-aware fit adds this fraction of the mean input energy times the weight error to its objective (the
# Gram matrix G + λI): input directions without calibration energy keep the residual's own weights instead of
# whatever fits the data, and a fit that can represent the residual reproduces it exactly (as MoS's own factors).
DAMPING = 1e-4


def rearranged(delta: torch.Tensor, n: int) -> torch.Tensor:
    """R(Δ) (n² × pq): row (a, b) holds the (a, b)-th p × q block of Δ (out = n·p, in = n·q), flattened."""
    out_features, in_features = delta.shape
    p, q = out_features // n, in_features // n
    return delta.reshape(n, p, n, q).permute(0, 2, 1, 3).reshape(n * n, p * q)


class Kronecker(Form):
    name = "kronecker"
    summary = "Compacter: shared slow matrices (x) each layer's fast factors of rank --rank"
    Options = KroneckerOptions
    trainable = ("kron_s", "kron_t")

    def __init__(self, options: KroneckerOptions | None = None) -> None:
        super().__init__(options)
        self.factor, self.terms = kron_sizes(self.options.kron_factor, self.options.kron_terms)

    def full_rank(self, shape: tuple[int, int]) -> int:
        return min(shape) // self.factor

    def describe(self) -> str:
        return f", Kronecker {self.terms} shared {self.factor}x{self.factor} slow matrices"

    def check(self, rank: int, shape: tuple[int, int], where: str) -> None:
        out_features, in_features = shape
        n, count = self.factor, self.terms
        if out_features % n or in_features % n:
            raise LayerfoldError(f"{where}: {n}x{n} Kronecker factors do not tile a {out_features}x{in_features} "
                                 f"projection (--kron-factor must divide both sides)")  # fmt: skip
        if count > n * n:
            raise LayerfoldError(f"{where}: {count} Kronecker slow matrices of {n}x{n} are more than the {n * n} "
                                 f"that span them (--kron-terms at most {n * n})")  # fmt: skip
        largest = min(out_features, in_features) // n
        if not 1 <= rank <= largest:
            raise LayerfoldError(f"{where}: a kronecker relaxation's fast factors need a rank of 1 to {largest} for "
                                 f"a {out_features}x{in_features} projection with {n}x{n} slow matrices, got {rank}")  # fmt: skip

    def _blocks(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features // self.factor, in_features // self.factor

    def max_rank(self, out_features: int, in_features: int) -> int:
        return max(1, min(self._blocks(out_features, in_features)))

    def layer_shapes(self, rank: int, out_features: int, in_features: int):
        p, q = self._blocks(out_features, in_features)
        return {"kron_s": (self.terms, p, rank), "kron_t": (self.terms, rank, q)}

    def pool_shapes(self, rank: int, out_features: int, in_features: int):
        return {"kron_slow": (self.terms, self.factor, self.factor)}

    def output(self, module, x: torch.Tensor) -> torch.Tensor:
        n = self.factor
        blocks = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)  # (…, n, q): the input's n blocks
        inner = torch.einsum("...bq,krq->...kbr", blocks, module.kron_t)
        mixed = torch.einsum("kab,...kbr->...kar", module.shared.kron_slow, inner)
        out = torch.einsum("...kar,kpr->...ap", mixed, module.kron_s)
        return out.reshape(*x.shape[:-1], module.out_features)

    def weight(self, module) -> torch.Tensor:
        fast = module.kron_s @ module.kron_t  # (terms, p, q)
        return sum(torch.kron(slow, f) for slow, f in zip(module.shared.kron_slow, fast))

    def fit(self, residuals, grams, rank, seed):
        """The slow matrices: the top ``terms`` left singular vectors of [R(Δ₁) … R(Δₘ)]; each position's fast
        factors fitted given them (``_fast_factors``), of rank ``rank``; then each slow matrix and its fast
        factors rescaled to the same RMS (products unchanged) so that healing's equal-sized steps suit both."""
        layers = sorted(residuals)
        n, terms = self.factor, self.terms
        stacked = torch.cat([rearranged(residuals[i], n) for i in layers], 1)
        left = torch.linalg.svd(stacked, full_matrices=False)[0][:, :terms]
        if left.shape[1] < terms:  # fewer directions than slow matrices asked: the rest stay zero
            left = torch.cat([left, left.new_zeros(n * n, terms - left.shape[1])], 1)
        slow = left.T.reshape(terms, n, n).clone()
        fast = {i: self._fast_factors(residuals[i], slow, grams[i], rank, f"kronecker fast factors of layer {i}")
                for i in layers}  # fmt: skip
        # Balance: Aₖ·c, sₖ/√c, tₖ/√c with c = (RMS of the fast factors / RMS of Aₖ)^(2/3).
        slow_rms = slow.pow(2).mean((1, 2)).sqrt()
        fast_rms = torch.stack([torch.cat([s.flatten(1), t.flatten(1)], 1).pow(2).mean(1) for s, t in fast.values()])
        fast_rms = fast_rms.mean(0).sqrt()
        usable = (slow_rms > 0) & (fast_rms > 0)
        scale = torch.where(usable, (fast_rms / slow_rms.clamp_min(1e-300)).pow(2 / 3), torch.ones_like(slow_rms))
        slow = slow * scale[:, None, None]
        root = scale.sqrt()[:, None, None]
        return {"kron_slow": slow}, {i: {"kron_s": s / root, "kron_t": t / root} for i, (s, t) in fast.items()}

    def _fast_factors(self, delta: torch.Tensor, slow: torch.Tensor, gram: torch.Tensor | None, rank: int, where: str):
        """(s, t): (terms, p, r) and (terms, r, q) with Σₖ Aₖ ⊗ sₖtₖ ≈ Δ on the inputs whose Gram matrix is ``gram``
        (damped: G + λI, see ``DAMPING``).

        With X the n × q blocks of an input, the output error is Y − Σₖ (AₖX) Bₖᵀ: a linear least-squares problem
        in the stacked Bₖᵀ whose normal matrix N[k, l] = Σ_bc (AₖᵀAₗ)[b, c] G[b, c] and right-hand side
        Σ_ab Aₖ[a, b] (G Δᵀ)[b, a] are read off G's q × q blocks. Each full Bₖ is then truncated to rank r,
        whitened by N[k, k] (the Gram matrix of the inputs AₖX it sees)."""
        n, terms = self.factor, slow.shape[0]
        p, q = self._blocks(*delta.shape)
        if gram is None:
            full = torch.einsum("kab,abij->kij", slow, rearranged(delta, n).reshape(n, n, p, q))
            u, s, vh = torch.linalg.svd(full, full_matrices=False)
            root = s[:, :rank].sqrt()
            return u[:, :, :rank] * root[:, None, :], root[:, :, None] * vh[:, :rank]
        gram = gram.double().clone()
        gram.diagonal().add_(DAMPING * float(gram.diagonal().mean().clamp_min(1e-12)))
        blocks = gram.reshape(n, q, n, q)  # [b, i, c, j]: the (b, c) q × q block of G + λI
        normal = delta.new_zeros(terms, q, terms, q)
        for k in range(terms):
            for l in range(k, terms):
                mixing = slow[k].T @ slow[l]  # (AₖᵀAₗ)[b, c]
                normal[k, :, l] = torch.einsum("bc,bicj->ij", mixing, blocks)
                normal[l, :, k] = normal[k, :, l].T
        crossed = (gram @ delta.T).reshape(n, q, n, p)  # (G Δᵀ)[b, i, a, m]
        rhs = torch.einsum("kab,biam->kim", slow, crossed)  # (terms, q, p)
        matrix = normal.reshape(terms * q, terms * q)
        matrix.diagonal().add_(1e-12 * float(matrix.diagonal().mean().clamp_min(1e-300)))  # zero (padding) slow ones
        solved = torch.linalg.solve(matrix, rhs.reshape(terms * q, p)).reshape(terms, q, p)
        s_factors, t_factors = [], []
        for k in range(terms):  # rank ≤ min(p, q) (Kronecker.check): the SVD has as many values as asked
            u, sigma, v = whitened_svd(solved[k].T, normal[k, :, k], rank, where)
            root = sigma.sqrt()
            s_factors.append(u * root)
            t_factors.append(root[:, None] * v)
        return torch.stack(s_factors), torch.stack(t_factors)
