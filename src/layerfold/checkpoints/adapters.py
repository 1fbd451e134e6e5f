"""PEFT LoRA on folded models, through PEFT's extension point for custom layers
(``LoraConfig._register_custom_module``).

PEFT knows nn.Linear and Conv1D; a tied or factorised projection is neither, so a plain ``LoraConfig`` refuses it
("Target module ... is not supported"). ``lora_config`` returns a ``LoraConfig`` that maps every folded
projection type to ``FoldedLoraLinear``: PEFT's own LoRA layer, which computes ``base(x) + B A x · scale`` around
the folded module, plus a merge that keeps the fold. Merging into the shared weight would change every layer of the
group, so ``merge`` adds the update to *this layer's* relaxation instead (``FoldedProjection.add_low_rank``: a
tied layer's LoRA relaxation grows by the adapter's rank, exactly); the next save records the new ranks in the
plan (``tie.build.sync``). A factorised (basis) projection has no per-layer low-rank part and refuses to merge with
one line; its adapter trains, saves and loads as usual.

    import layerfold
    from layerfold.checkpoints.adapters import lora_config, load_adapter
    from peft import get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained("folded"), lora_config(r=8, target_modules=["q_proj"]))
    ...train, model.save_pretrained("adapter")...
    model = load_adapter(AutoModelForCausalLM.from_pretrained("folded"), "adapter")   # PeftModel
    model.merge_and_unload().save_pretrained("folded-merged")   # still a fold, reloads bit for bit

Needs the ``peft`` extra (``pip install layerfold[peft]``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..core.errors import LayerfoldError, first_line, renamed
from ..operations.base import FoldedProjection
from ..core.store import STATE_ATTRIBUTE

try:
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as err:  # pragma: no cover - the optional extra
    raise ImportError("layerfold.checkpoints.adapters needs PEFT: pip install 'layerfold[peft]'") from err


def folded_projection_types() -> list[type[nn.Module]]:
    """Every FoldedProjection subclass the operations define (each operation's modules are imported)."""
    from .. import operations  # noqa: F401 (imports every operation's modules)

    found, stack = [], [FoldedProjection]
    while stack:
        for subclass in stack.pop().__subclasses__():
            found.append(subclass)
            stack.append(subclass)
    return found


class FoldedLoraLinear(LoraLinear):
    """PEFT's LoRA layer around a folded projection. A folded projection maps x to y like nn.Linear whatever
    layout it stores, so the adapter is in nn.Linear layout (``fan_in_fan_out`` off)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        kwargs["fan_in_fan_out"] = False
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            if name in self.lora_variant or self.lora_bias[name]:
                raise LayerfoldError(f"adapter {name}: only plain LoRA (no DoRA or other variant, no lora_bias) merges into a fold")
            lora_a = self.lora_A[name].weight.float()
            lora_b = self.lora_B[name].weight.float() * self.scaling[name]
            if safe_merge and not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.add_low_rank(lora_b, lora_a)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                base.remove_low_rank(self.lora_A[name].weight.shape[0])


def register_folded_types(config: LoraConfig) -> LoraConfig:
    """Let ``config`` put LoRA layers on folded projections (every type, plus whatever it handled before), and
    never on the shared weights themselves (the store, ``…layerfold_shared…``, whose entries carry the
    projections' names too)."""
    config._register_custom_module({kind: FoldedLoraLinear for kind in folded_projection_types()})
    store = rf".*(^|\.){re.escape(STATE_ATTRIBUTE)}\..*"
    excluded = config.exclude_modules
    if excluded is None:
        config.exclude_modules = store
    elif isinstance(excluded, str):
        config.exclude_modules = excluded if store in excluded else f"(?:{excluded})|{store}"
    else:  # PEFT matches a list by whole name or dotted suffix; the same as one pattern
        names = "|".join(re.escape(name) for name in excluded)
        config.exclude_modules = f"(?:.*\\.)?(?:{names})|{store}"
    return config


def lora_config(**options: Any) -> LoraConfig:
    """A ``peft.LoraConfig(**options)`` that can target folded projections."""
    return register_folded_types(LoraConfig(**options))


def _sides(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a projection: nn.Linear and folded projections say so; GPT-2's Conv1D has nx and nf."""
    for names in (("in_features", "out_features"), ("nx", "nf")):
        sides = tuple(getattr(module, name, None) for name in names)
        if all(isinstance(side, int) for side in sides):
            return sides
    return None


def check_adapter_sizes(model: nn.Module, config: PeftConfig, where: str) -> None:
    """An adapter's ranks (``r``, ``rank_pattern``) are positive integers no larger than the model's largest
    projection allows, checked before PEFT allocates its factors (a crafted ``r`` would allocate without bound)."""
    largest = max((min(sides) for sides in map(_sides, model.modules()) if sides), default=0)
    pattern = getattr(config, "rank_pattern", None) or {}
    ranks = [("r", getattr(config, "r", None))] + [(f"rank_pattern[{k!r}]", v) for k, v in dict(pattern).items()]
    for name, rank in ranks:
        if rank is None and name == "r":
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max(largest, 1):
            raise LayerfoldError(
                f"{where}: adapter {name} is {rank!r}; this model's projections allow a rank of 1 to {largest}"
            )


def load_adapter(model: nn.Module, adapter: str, **options: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter)`` for a fold: the saved config, registered (PEFT does not save
    custom module mappings)."""
    try:
        config = PeftConfig.from_pretrained(adapter)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise LayerfoldError(f"{adapter}: not a readable PEFT adapter ({first_line(err)})") from None
    check_adapter_sizes(model, config, adapter)
    if isinstance(config, LoraConfig):
        register_folded_types(config)
    return PeftModel.from_pretrained(model, adapter, config=config, **options)


def _folded_injection(inject_adapter):
    """PEFT's ``inject_adapter``, which first registers the folded types with the adapter's config when the model
    holds folded projections: PEFT saves no custom mappings (so an adapter reloaded by PEFT's own loaders has
    none), and the store's shared weights carry the projections' names, so they must be excluded before PEFT
    matches any module (PEFT 0.22 may reach the store first)."""

    def inject(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config.get(adapter_name)
        if isinstance(config, LoraConfig) and any(isinstance(m, FoldedProjection) for m in model.modules()):
            register_folded_types(config)
        return inject_adapter(self, model, adapter_name, *args, **kwargs)

    inject.layerfold = True
    return inject


def _folded_dispatch(create_new_module):
    """PEFT's ``LoraModel._create_new_module``, which checks an adapter's rank against the folded projection it
    goes on before PEFT allocates the factors (a crafted ``r`` would allocate without bound). Other modules go to
    PEFT unchanged."""

    def create(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, FoldedProjection):
            rank = kwargs.get("r", getattr(lora_config, "r", None))
            largest = max(base.in_features, base.out_features)
            if isinstance(rank, int) and not 1 <= rank <= largest:
                raise LayerfoldError(f"adapter {adapter_name}: rank {rank} on a {base.out_features}x{base.in_features} "
                                     f"folded projection (at most {largest})")  # fmt: skip
            if type(base) not in (lora_config._custom_modules or {}):
                register_folded_types(lora_config)
        return create_new_module(lora_config, adapter_name, target, **kwargs)

    create.layerfold = True
    return staticmethod(create)


def install_peft_dispatch() -> None:
    """Let PEFT's own loaders (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers'
    ``load_adapter``) and a plain ``LoraConfig`` put an adapter on a fold's folded projections, which PEFT refuses
    otherwise ("Target module … is not supported"). Idempotent; done when this module is imported, which
    ``import layerfold`` and loading a fold do whenever PEFT is imported."""
    current = LoraModel.__dict__.get("_create_new_module")
    if isinstance(current, staticmethod) and not getattr(current.__func__, "layerfold", False):
        LoraModel._create_new_module = _folded_dispatch(current.__func__)
    if not getattr(LoraModel.inject_adapter, "layerfold", False):
        LoraModel.inject_adapter = _folded_injection(LoraModel.inject_adapter)


install_peft_dispatch()


register = renamed(register_folded_types, "layerfold.checkpoints.adapters.register")  # the old name, kept working
