"""The modules of a tie group: the shared weight, held once in the store, and each layer's TiedLinear.

Each layer position keeps a ``TiedLinear`` that points at its group's shared projection without registering
it (so every shared tensor appears once in ``parameters()`` and ``state_dict()``) and owns its bias and its
LoRA relaxation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import FoldedProjection
from .forms import Form


class SharedProjection(nn.Module):
    """One projection's weight (and optionally bias) shared by every layer of a tie group.

    The weight keeps the original module's layout: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        transposed: bool = False,
        pool: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.transposed = transposed  # the weight is (in, out) (Conv1D)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        for name, tensor in (pool or {}).items():  # a relaxation form's tensors shared by the group (MoS's pool)
            self.register_parameter(name, nn.Parameter(tensor))


class TiedPosition(FoldedProjection):
    """What every tied layer position is: its group's shared weight (held by the store: a tuple hides it from
    nn.Module registration, so every shared tensor appears once in ``parameters()`` and ``state_dict()``) and its
    own bias (or the group's shared one)."""

    def __init__(self, shared: SharedProjection, *, transposed: bool, bias: nn.Parameter | None) -> None:
        super().__init__()
        self._shared = (shared,)
        self.transposed = transposed
        self.bias = bias

    @property
    def shared(self) -> SharedProjection:
        return self._shared[0]

    @property
    def weight(self) -> torch.Tensor:
        """The shared weight in the original module's layout (for code that reads ``.weight.dtype``)."""
        return self.shared.weight

    @property
    def in_features(self) -> int:
        return self.shared.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.shared.weight.shape[1 if self.transposed else 0]

    def shared_weight(self) -> torch.Tensor:
        """The shared weight in nn.Linear layout (out, in)."""
        return self.shared.weight.t() if self.transposed else self.shared.weight

    def merged_bias(self) -> torch.Tensor | None:
        return self.bias if self.bias is not None else self.shared.bias

    def shared_modules(self) -> list[nn.Module]:
        return [self.shared]


class TiedLinear(TiedPosition):
    """A projection computed from its group's shared weight plus this layer's own LoRA relaxation:
    ``y = x W_sharedᵀ + (x Aᵀ) Bᵀ + b``."""

    def __init__(
        self,
        shared: SharedProjection,
        *,
        transposed: bool,
        bias: nn.Parameter | None,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(shared, transposed=transposed, bias=bias)
        self.rank = rank
        out_features, in_features = self.out_features, self.in_features
        if rank > 0:
            self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)

    def relaxation_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lora_A, self.lora_B) if p is not None]

    def add_low_rank(self, lora_b: torch.Tensor, lora_a: torch.Tensor) -> None:
        """Append the update to this layer's relaxation (its rank grows by the update's); exact."""
        lora_a = lora_a.detach().to(self.weight.dtype)
        lora_b = lora_b.detach().to(self.weight.dtype)
        trainable = self.lora_A.requires_grad if self.lora_A is not None else True
        if self.lora_A is not None:
            lora_a = torch.cat([self.lora_A.detach(), lora_a])
            lora_b = torch.cat([self.lora_B.detach(), lora_b], dim=1)
        self.set_relaxation(lora_a, lora_b, trainable=trainable)

    def remove_low_rank(self, rank: int) -> None:
        keep = self.rank - rank
        trainable = self.lora_A.requires_grad
        if keep == 0:
            self.rank = 0
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            return
        self.set_relaxation(self.lora_A.detach()[:keep], self.lora_B.detach()[:, :keep], trainable=trainable)

    def set_relaxation(self, lora_a: torch.Tensor, lora_b: torch.Tensor, *, trainable: bool = True) -> None:
        """Replace the relaxation by these factors (A: r×in, B: out×r), whatever its rank was."""
        self.rank = lora_a.shape[0]
        self.lora_A = nn.Parameter(lora_a.contiguous(), requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_b.contiguous(), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.shared_weight(), self.merged_bias())
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def merged_weight(self) -> torch.Tensor:
        """This layer's effective weight, in nn.Linear layout (out, in)."""
        weight = self.shared_weight()
        if self.lora_A is not None:
            weight = weight + self.lora_B @ self.lora_A
        return weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FormTiedLinear(TiedPosition):
    """A tied projection whose relaxation has another form than a private LoRA (``forms``: VeRA, SVFit, MoS's
    pools, Kronecker): ``y = x W_sharedᵀ + form(x) + b``. The form's per-position tensors are this module's
    parameters; its pooled ones live in the shared projection; regenerated ones (VeRA's bases) are made by the
    form."""

    def __init__(
        self,
        shared: SharedProjection,
        form: Form,
        *,
        transposed: bool,
        bias: nn.Parameter | None,
        rank: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(shared, transposed=transposed, bias=bias)
        self.form, self.form_rank, self.seed = form, rank, seed
        for name, shape in form.layer_shapes(rank, self.out_features, self.in_features).items():
            if name in form.integer:  # a parameter, not a buffer: the engine computes parameters, and saves them
                tensor = torch.zeros(shape, dtype=torch.long, device=device)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))

    def relaxation_parameters(self) -> list[nn.Parameter]:
        """The form's trainable per-position tensors and its pool (what ``--train relax`` trains)."""
        own = [getattr(self, name) for name in self.form.trainable if hasattr(self, name)]
        pool = [getattr(self.shared, name) for name in self.form.pool_shapes(self.form_rank, 1, 1)]
        return own + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shared_weight(), self.merged_bias()) + self.form.output(self, x)

    def merged_weight(self) -> torch.Tensor:
        return self.shared_weight() + self.form.weight(self)

    def remove_low_rank(self, rank: int) -> None:
        raise NotImplementedError("a form relaxation takes no merged low-rank update")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, relax={self.form.name}, "
                f"rank={self.form_rank}")  # fmt: skip
