"""What every operation of a fold plan is: a small dataclass that checks itself and round-trips as a mapping.

An operation names original layer indices (0 .. num_layers-1) only. ``check`` rejects what no model could
take; ``validate`` checks it against a model's family and layers (projections, ranks within shapes). Checks
that involve several operations (a layer tied twice, a tied layer dropped) are the plan's.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Union

import torch
from torch import nn

from ..core.errors import LayerfoldError

Rank = Union[int, str]  # an int >= 0 or "full"


def sorted_layers(value: Any) -> Any:
    """A list or tuple of layer indices as a sorted list; anything else as it is, for ``check`` to refuse."""
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
        return sorted(value)
    return value


def check_layer(i: Any, num_layers: int, where: str) -> None:
    if isinstance(i, bool) or not isinstance(i, int):
        raise LayerfoldError(f"{where}: layer indices must be integers, got {i!r}")
    if not 0 <= i < num_layers:
        raise LayerfoldError(f"{where}: layer {i} is out of range for a {num_layers}-layer model")


def check_layer_list(values: Any, num_layers: int, where: str, *, minimum: int = 1) -> None:
    """A list of at least ``minimum`` distinct layer indices."""
    if not isinstance(values, list) or len(values) < minimum:
        need = "a non-empty list" if minimum == 1 else f"a list of at least {minimum}"
        raise LayerfoldError(f"{where}: must be {need} of layer indices, got {values!r}")
    seen = set()
    for i in values:
        check_layer(i, num_layers, where)
        if i in seen:
            raise LayerfoldError(f"{where}: layer {i} is listed twice")
        seen.add(i)


def check_rank(value: Any, where: str, *, minimum: int = 0, full: bool = True) -> None:
    if full and value == "full":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "0, a positive integer or 'full'" if full else "a positive integer"
        raise LayerfoldError(f"{where}: must be {allowed}, got {value!r}")


def check_bool(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise LayerfoldError(f"{where}: must be true or false, got {value!r}")


@dataclass
class Operation:
    """One step of a plan. Subclasses set ``kind``, its name in plan files; tensors it shares across layers are
    held in the fold's store under its key ``<kind>_<n>``."""

    kind: ClassVar[str] = ""
    # Whether a fold made only of operations like this one is the base architecture (fewer layers, narrower
    # projections) that transformers loads without layerfold; False where the operation puts its own modules in.
    keeps_architecture: ClassVar[bool] = True

    def check(self, num_layers: int, where: str) -> None:
        raise NotImplementedError

    def calibration_steps(self) -> list[str]:
        """What of this operation fits to calibration data, named for messages; empty when nothing does."""
        return []

    def needs_calibration(self) -> bool:
        """Whether building this operation needs calibration statistics (its layers' Gram matrices)."""
        return bool(self.calibration_steps())

    @classmethod
    def describe(cls, operations: list["Operation"]) -> list[str]:
        """Phrases describing a plan's operations of this kind (all of them, in plan order), for summaries,
        reports and model cards; none by default."""
        return []

    def validate(self, family, layers, where: str) -> None:
        """Checks that need the model: ``family`` and its block list ``layers``."""

    @classmethod
    def example(cls, model: nn.Module) -> list["Operation"]:
        """A small plan's operations that use this kind on a 4-layer model (calibrated where the kind can be, so
        that its fitted path is tested too): what the common tester (tests/test_common_operations.py) folds,
        saves, loads, exports and streams on every family layout."""
        raise NotImplementedError(f"operation {cls.kind} has no example plan for the common tester")

    def to_dict(self) -> dict[str, Any]:
        data = {"op": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Operation":
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known) - {"op"})
        if unknown:
            raise LayerfoldError(f"{where}.{unknown[0]}: unknown field of a {cls.kind} operation (known: {', '.join(known)})")
        try:
            return cls(**{k: v for k, v in data.items() if k != "op"})
        except TypeError:
            required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
            missing = [name for name in required if name not in data]
            raise LayerfoldError(f"{where}: a {cls.kind} operation needs {', '.join(missing) or 'its fields'}") from None


@dataclass
class Recipe:
    """How one tensor a folded model stores is made (see ``layerfold.engine.execute``): copied from an original tensor,
    or computed by the operation with key ``op`` from its ``inputs``, each (original layer, name inside the
    block) or (None, full tensor name). Recipes of one operation with the same ``unit`` compute together."""

    name: str  # the folded model's (stored) tensor name
    role: str  # copy | value | what the operation calls it (shared, lora_A, basis, ...)
    inputs: list[tuple]
    op: str | None = None
    unit: tuple = ()
    detail: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


class FoldedProjection(nn.Module):
    """What an operation puts in place of a layer's projection (nn.Linear, or GPT-2's Conv1D when
    ``transposed``). The rest of layerfold knows folded projections only through this: export merges them
    (``merged_weight``, ``merged_bias``), healing trains each layer's own part (``relaxation_parameters``)."""

    op_key: str | None = None  # the key of the operation that made it (set by its build)
    transposed: bool = False

    def merged_weight(self) -> torch.Tensor:
        """This layer's effective weight, in nn.Linear layout (out, in)."""
        raise NotImplementedError

    def merged_bias(self) -> torch.Tensor | None:
        raise NotImplementedError

    def relaxation_parameters(self) -> list[nn.Parameter]:
        """This layer's own trainable part (not the weights it shares)."""
        raise NotImplementedError

    def shared_modules(self) -> list[nn.Module]:
        """The store modules (tensors shared across layers) this projection reads; block-wise healing trains the
        layers that read one module together."""
        return []

    def add_low_rank(self, lora_b: torch.Tensor, lora_a: torch.Tensor) -> None:
        """Add ``lora_b @ lora_a`` (out×r, r×in) to this layer's effective weight, exactly and for this layer only
        (how a PEFT LoRA merges into a fold). Operations whose layers have no low-rank slot refuse."""
        raise LayerfoldError(
            f"{type(self).__name__} cannot take a merged low-rank update (it shares a weight with no per-layer "
            "low-rank part): keep the adapter unmerged, or call layerfold.materialize(model) before merging"
        )

    def remove_low_rank(self, rank: int) -> None:
        """Undo the last ``add_low_rank`` of that rank."""
        raise NotImplementedError
