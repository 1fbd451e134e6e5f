"""Reading folded checkpoints: their names and the guard in their config, the format check and renames, the
checks of a folder before anything loads, its weights and its empty skeleton (writing, loading and exporting:
``checkpoints.folded``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .. import __version__
from ..core.tensor_files import (
    has_weights,
    inside,
    load_all,
    read_metadata,
    stored_shapes,
)
from ..engine.execute import apply_structure
from ..core.errors import LayerfoldError, first_line
from ..core.families import Family, family_for_model_type
from ..operations.plan import FoldPlan, legacy_store_keys
from .originals import (
    CONFIG_NAME,
    LAYER_FIELDS,
    check_config_sizes,
    model_class_for,
    read_json,
)
from ..core.store import FORMAT_KEY, FORMAT_VERSION, STATE_ATTRIBUTE


WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "plan.yaml"
REMOTE_CODE_NAME = "modeling_layerfold.py"
ALIASES_KEY = "layerfold_aliases"
# What a fold's config.json adds to its base_config so that transformers never loads the folder as the plain
# architecture. A concrete class (``LlamaForCausalLM.from_pretrained(fold)``, the route of PEFT's Auto classes)
# reads base_config as its own config, since its model type matches, and would load the folded tensors as
# "unexpected" beside randomly initialised projections. With the guard, a process that has not imported layerfold
# is refused with this text (transformers rejects the weights file it names, and skips the quantization method it
# does not know); after ``import layerfold`` the quantization method is the fold quantizer (``hub``), which drops
# the file name and builds the fold before the weights are read. Both are removed again on load (``unguarded``).
NOT_WITHOUT_LAYERFOLD = "this folder is a layerfold fold: import layerfold before loading it (pip install layerfold)"
GUARD = {"transformers_weights": NOT_WITHOUT_LAYERFOLD, "quantization_config": {"quant_method": "layerfold"}}


def guarded(base_config: dict) -> dict:
    """The base config as a fold's config.json stores it: with ``GUARD``'s fields."""
    return {**unguarded(base_config), **GUARD}


def unguarded(base_config: dict) -> dict:
    """The base config without ``GUARD``'s fields (nor a quantization config of the fold quantizer's)."""
    config = {key: value for key, value in base_config.items() if key != "transformers_weights"}
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == GUARD["quantization_config"]["quant_method"]:
        del config["quantization_config"]
    return config


# ---- folded checkpoints -----------------------------------------------------------------------------------
def _aliases(path: Path) -> dict[str, str]:
    """The alias table of a checkpoint's metadata: other names of stored tensors (tied embeddings)."""
    text = read_metadata(path).get(ALIASES_KEY, "{}")
    try:
        aliases = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        raise LayerfoldError(f"{path}: the weights' {ALIASES_KEY} metadata is not JSON") from None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise LayerfoldError(f"{path}: the weights' {ALIASES_KEY} metadata is not a map of tensor names")
    return aliases


def _check_aliases(path: Path, aliases: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """An alias names a tensor that is stored, under a name that is not stored itself, with the same shape."""
    for alias, name in aliases.items():
        if alias in shapes:
            raise LayerfoldError(f"{path}: alias {alias} would replace a stored tensor of that name")
        if name not in shapes:
            raise LayerfoldError(f"{path}: alias {alias} names {name}, which is not stored")


def read_weights(
    path: str | Path, aliases: dict[str, str] | None = None, renamed: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a folded checkpoint's weight files, each stored tensor also under its aliases' names.
    ``aliases``: the checkpoint's alias table when the caller has already read and checked it; ``renamed``:
    stored names the model now calls otherwise (a format-1 checkpoint's), the aliases given in the new names."""
    path = Path(path)
    if aliases is None:
        aliases = _aliases(path)
        _check_aliases(path, aliases, stored_shapes(path))
    tensors = load_all(path)
    if renamed:
        tensors = {renamed.get(name, name): tensor for name, tensor in tensors.items()}
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def read_checkpoint_config(path: str | Path) -> dict:
    """A folded checkpoint's config.json, checked for the fields ``load`` needs (nothing is built yet)."""
    path = Path(path)
    if not path.exists():
        raise LayerfoldError(f"folded model not found: {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise LayerfoldError(f"no config.json in {path}: not a layerfold checkpoint")
    config = read_json(inside(path, config_file))
    if not isinstance(config, dict) or config.get("model_type") != "layerfold":
        raise LayerfoldError(f"{path} is not a layerfold checkpoint (its config.json has no layerfold model type)")
    for key, kind in (("base_architecture", str), ("base_config", dict), ("fold_plan", dict)):
        if not isinstance(config.get(key), kind):
            raise LayerfoldError(f"{config_file}: {key} is missing or not a {'string' if kind is str else 'mapping'}")
    if not isinstance(config["base_config"].get("model_type"), str):
        raise LayerfoldError(f"{config_file}: base_config.model_type is missing")
    if not has_weights(path):
        raise LayerfoldError(f"{path} has no {WEIGHTS_NAME} (nor shards with an index)")
    return config


@dataclasses.dataclass
class CheckedCheckpoint:
    """What ``load`` builds from, after every check that needs no model: see ``check_checkpoint``."""

    config: dict
    family: Family
    base: transformers.PretrainedConfig
    model_class: type
    plan: FoldPlan
    shapes: dict[str, tuple[int, ...]]  # by the names the model has (a format-1 checkpoint's renamed)
    aliases: dict[str, str]  # likewise
    renamed: dict[str, str]  # stored name -> the model's name, for the names that differ


def checkpoint_format(config: dict, where: str) -> int:
    """The checkpoint format of a folded checkpoint's config: 1 when it does not say (layerfold 0.1)."""
    version = config.get(FORMAT_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LayerfoldError(f"{where}: {FORMAT_KEY} must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise LayerfoldError(
            f"{where}: written in checkpoint format {version} by a newer layerfold; this one "
            f"({__version__}) reads formats 1 to {FORMAT_VERSION}: upgrade layerfold (pip install -U layerfold)"
        )
    return version


def format_1_names(raw_plan: dict, names) -> dict[str, str]:
    """The new name of each stored name of a format-1 checkpoint whose store entry is named by position
    (``plan.legacy_store_keys``)."""
    keys = legacy_store_keys(raw_plan)
    pattern = re.compile(r"((?:^|\.)" + STATE_ATTRIBUTE + r"\.)(\d+)(\.)")
    renamed = {}
    for name in names:
        match = pattern.search(name)
        if match and int(match.group(2)) in keys:
            renamed[name] = name[: match.start(2)] + keys[int(match.group(2))] + name[match.end(2) :]
    return renamed


def _layer_indices(names, family: Family) -> set[int]:
    pattern = re.compile(r"(?:^|\.)" + re.escape(family.layers) + r"\.(\d+)\.")
    return {int(m.group(1)) for name in names if (m := pattern.search(name))}


def check_checkpoint(path: str | Path) -> CheckedCheckpoint:
    """Validate a folded checkpoint before anything is built: the config's fields, the base architecture (only
    the family's own model classes), the plan against the base config (layer counts, sizes), the weight files'
    headers and the aliases. Every failure is one ``LayerfoldError`` line."""
    path = Path(path)
    config = read_checkpoint_config(path)
    where = f"{path / CONFIG_NAME}"
    base_config = unguarded(config["base_config"])
    model_type = base_config.pop("model_type")
    family = family_for_model_type(model_type)
    model_class = model_class_for(config["base_architecture"], model_type, f"{where}: base_architecture")
    version = checkpoint_format(config, where)
    plan = FoldPlan.from_dict(config["fold_plan"])
    shapes = stored_shapes(path)
    aliases = _aliases(path)
    _check_aliases(path, aliases, shapes)
    renamed = format_1_names(config["fold_plan"], list(shapes) + list(aliases)) if version == 1 else {}
    if renamed:
        shapes = {renamed.get(name, name): shape for name, shape in shapes.items()}
        aliases = {renamed.get(a, a): renamed.get(n, n) for a, n in aliases.items()}
    largest = max((max(shape, default=1) for shape in shapes.values()), default=1)
    check_config_sizes(base_config, f"{where}: base_config", largest_dimension=largest)
    layers = next((base_config[name] for name in LAYER_FIELDS if name in base_config), None)
    if plan.num_layers != layers:
        raise LayerfoldError(f"{where}: fold_plan.num_layers is {plan.num_layers} but base_config has {layers} layers")
    kept = plan.num_layers - len(plan.dropped())  # not kept_layers(): num_layers may be huge here
    stored = len(_layer_indices(list(shapes) + list(aliases), family))
    if kept != stored:
        raise LayerfoldError(f"{where}: fold_plan keeps {kept} layers but the weights hold {stored}")
    # Built only now: some configs allocate per layer (layer_types), so the layer count is checked first.
    try:
        base = CONFIG_MAPPING[model_type].from_dict(base_config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise LayerfoldError(f"{where}: base_config cannot be read: {first_line(err)}") from None
    return CheckedCheckpoint(config, family, base, model_class, plan, shapes, aliases, renamed)


def skeleton(path: str | Path) -> tuple[nn.Module, CheckedCheckpoint]:
    """A folded checkpoint's model on the meta device (its structure, no tensors), checked against the weights'
    headers: what ``load`` fills, and what a streamed heal fills one block at a time."""
    path = Path(path)
    checked = check_checkpoint(path)
    config, plan = checked.config, checked.plan
    try:
        with init_empty_weights(include_buffers=False):
            model = checked.model_class(checked.base)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise LayerfoldError(f"{path / CONFIG_NAME}: cannot build {config['base_architecture']}: {first_line(err)}") from None
    plan.validate(model)  # ranks within each matrix's shape, projections of this family
    apply_structure(
        model,
        plan,
        base_config=unguarded(config["base_config"]),
        base_architecture=config["base_architecture"],
    )
    # Shapes from the headers (an alias has its tensor's), checked before any data is read.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {**checked.shapes, **{alias: checked.shapes[name] for alias, name in checked.aliases.items()}}
    for name, shape in stored.items():
        if name in expected and expected[name] != shape:
            raise LayerfoldError(f"{path}: {name} is {list(shape)} in the weights but {list(expected[name])} in the config")
    return model, checked
