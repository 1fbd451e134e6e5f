"""What ``drop`` operations do: take layers out of the stack and renumber what the architecture indexes per
layer. Drops take effect last (``engine.apply_structure`` calls ``drop_layers`` once, for the whole plan)."""

from __future__ import annotations

from torch import nn

from ...core.families import Family


def drop_layers(model: nn.Module, family: Family, kept: list[int], num_layers: int) -> None:
    if len(kept) == num_layers:
        return
    layers = family.layer_list(model)
    remaining = nn.ModuleList([layers[i] for i in kept])
    family.set_layer_list(model, remaining)
    # The KV cache is indexed by each attention module's layer_idx; it must count kept layers only.
    for position, block in enumerate(remaining):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[i] for i in kept]
    # Qwen2/Qwen3: layers from max_window_layers on use the sliding window; count the kept ones before it, so
    # that a config that derives layer_types again (an export, read without layerfold) derives the same.
    window_layers = getattr(config, "max_window_layers", None)
    if isinstance(window_layers, int):
        config.max_window_layers = sum(1 for i in kept if i < window_layers)
    config.num_hidden_layers = len(kept)
