"""Folded checkpoints in transformers' Auto classes: after ``import layerfold``,
``AutoModelForCausalLM.from_pretrained(folded_dir)`` (and every other Auto head the base architecture has) loads a
fold with no ``trust_remote_code``.

A folded checkpoint's config has model type ``layerfold``, so a transformers without layerfold refuses the folder
instead of loading a model with missing weights. ``register_auto_classes`` (run by ``import layerfold``) adds that model type
to ``AutoConfig`` and a loader class to each Auto model class. The loader validates the folder
(``io.check_checkpoint``), builds the base architecture's own config (with the caller's config overrides), and
hands loading to the base class's own ``from_pretrained`` with a *fold quantizer*: transformers' extension point
for rebuilding modules on the meta device before the weights are read (how its quantizers and compressed-tensors
load their checkpoints). So ``dtype``, ``device_map``, ``attn_implementation``, Hub ids and the head classes work
as they do for any model, and the result is the base class itself (``LlamaForCausalLM``) with its folded modules,
whose ``save_pretrained`` writes a folded checkpoint again (``io.install_save_hook``).

``modeling_layerfold.py`` in a folded folder imports the classes below, so ``trust_remote_code=True`` still works
where layerfold is installed but not imported (another tool's process).
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..engine.execute import apply_structure
from ..core.errors import LayerfoldError, first_line, renamed
from .folded import CONFIG_NAME, NOT_WITHOUT_LAYERFOLD, check_checkpoint, install_save_hook, load, peft_dispatch, unguarded
from ..operations.plan import FoldPlan
from ..core.store import STATE_ATTRIBUTE

FOLD_METHOD = "layerfold"
# The Auto classes a fold can be loaded with (each only for a base architecture that has that head).
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForPreTraining",
    "AutoModelForNextSentencePrediction",
    "AutoModelForTextEncoding",
)
_HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# Keyword arguments of PreTrainedModel.from_pretrained that are not config fields (everything else that names a
# config field overrides it, as transformers does).
_LOADING_ARGUMENTS = frozenset(inspect.signature(PreTrainedModel.from_pretrained).parameters) | {
    "adapter_kwargs", "adapter_name", "attn_implementation", "device_map", "distributed_config", "dtype",
    "experts_implementation", "generation_config", "gguf_file", "key_mapping", "max_memory", "offload_buffers",
    "offload_folder", "output_loading_info", "proxies", "quantization_config", "state_dict", "subfolder",
    "torch_dtype", "tp_plan", "tp_size", "use_kernels", "variant", "_from_auto", "_from_pipeline",
}  # fmt: skip
# LayerfoldConfig's own fields: not overrides of the base config.
_FOLD_FIELDS = frozenset({"base_architecture", "base_config", "fold_plan", "layerfold_version", "layerfold_format",
                          "auto_map", "architectures", "model_type", "transformers_version"})  # fmt: skip


class LayerfoldConfig(PreTrainedConfig):
    model_type = "layerfold"

    base_architecture: str | None = None
    base_config: dict | None = None
    fold_plan: dict | None = None
    layerfold_version: str | None = None


class FoldQuantizationConfig(QuantizationConfigMixin):
    """What the fold quantizer builds: the plan (None: the plan of the folder being loaded, read by the quantizer —
    the route of a concrete class, whose config is the fold's stored ``quantization_config``). Lives only during
    ``from_pretrained`` (removed afterwards, so a loaded fold is not marked quantized and trains, moves and casts
    like any model)."""

    def __init__(self, fold_plan: dict | None = None, **kwargs: Any) -> None:
        self.quant_method = FOLD_METHOD
        self.fold_plan = fold_plan


class FoldQuantizer(HfQuantizer):
    """Puts the plan's modules into the freshly built (meta-device) model, so that transformers reads the folded
    checkpoint's tensors into them by name; nothing is quantized. It serves the Auto loaders below and the concrete
    classes (``LlamaForCausalLM.from_pretrained(fold)``), which find it through the ``quantization_config`` a fold's
    config stores (``io.GUARD``). Before any weight is read it checks that the class is the fold's architecture
    and that every tensor of the blocks and the shared store will be read from the checkpoint: a route that would
    leave folded weights randomly initialised is refused with one line."""

    requires_calibration = False
    checked = None  # the folder's CheckedCheckpoint, once known

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False

    def update_attn_implementation(self, config):
        # Called before transformers looks for the weights: drop the guard that makes it refuse the folder.
        if getattr(config, "transformers_weights", None) == NOT_WITHOUT_LAYERFOLD:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
        self.checked = check_checkpoint(folder) if folder is not None else None
        raw_plan = self.quantization_config.fold_plan
        if raw_plan is None:
            if self.checked is None:
                raise LayerfoldError("a fold loads from its folder: from_pretrained(folder) or layerfold.load(folder)")
            raw_plan = self.checked.config["fold_plan"]
            _check_class(model, self.checked)
        plan = FoldPlan.from_dict(raw_plan)
        plan.validate(model)
        apply_structure(model, plan, base_config=unguarded(model.config.to_dict()),
                        base_architecture=type(model).__name__)  # fmt: skip
        if self.checked is not None:
            _check_coverage(model, self.checked)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        renaming = _prefix_renaming(model, self.checked) if self.checked is not None else None
        conversions = super().update_weight_conversions(weight_conversions, model)
        return conversions if renaming is None else [renaming, *conversions]

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        self.remove_quantization_config(model)
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.config._is_quantized = False
                module.config.__dict__.pop("transformers_weights", None)
        install_save_hook(model)
        peft_dispatch()  # PEFT may have been imported since layerfold was
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _check_class(model, checked) -> None:
    """A concrete class loads a fold only if it is a class of the fold's base architecture."""
    if not isinstance(model.config, type(checked.base)):
        raise LayerfoldError(
            f"this fold is a {checked.config['base_architecture']} ({checked.base.model_type}); "
            f"{type(model).__name__} cannot load it"
        )


def _saved_prefix(checked) -> str | None:
    """The base model prefix of the fold's tensor names (None for a headless base model, whose names have none)."""
    headless = _head_class("AutoModel", checked) is checked.model_class
    return None if headless else checked.model_class.base_model_prefix


def _prefix_renaming(model, checked):
    """The renaming of the checkpoint's base prefix to this class's (LlamaForQuestionAnswering keeps its LlamaModel
    under ``transformer``, LlamaForCausalLM under ``model``), or None when transformers maps the names itself."""
    saved = _saved_prefix(checked)
    if saved is None or saved == model.base_model_prefix:
        return None
    from transformers.core_model_loading import WeightRenaming

    return WeightRenaming(source_patterns=rf"^{saved}\.", target_patterns=f"{model.base_model_prefix}.")


def _check_coverage(model, checked) -> None:
    """Every tensor of the folded blocks and of the shared store is in the checkpoint (up to the base model
    prefix, which transformers adds, strips or renames): else the class would start them from random values."""
    saved = _saved_prefix(checked)
    stored = {_unprefixed(name, saved) for name in [*checked.shapes, *checked.aliases]}
    family = checked.family
    fold_parts = (family.layers + ".", STATE_ATTRIBUTE + ".")
    for name in model.state_dict():
        short = _unprefixed(name, model.base_model_prefix)
        if short.startswith(fold_parts) and short not in stored:
            raise LayerfoldError(
                f"{type(model).__name__} would not find the fold's {short} in the checkpoint (it would start random); "
                f"load this fold as {checked.config['base_architecture']}, with an Auto class or layerfold.load"
            )


def _unprefixed(name: str, prefix: str | None) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


class _LayerfoldAutoModel(PreTrainedModel):
    """A loader for one Auto class: ``from_pretrained`` returns the base architecture's model for that head."""

    config_class = LayerfoldConfig
    base_model_prefix = "model"
    auto_class: str = "AutoModel"

    def __init__(self, config: LayerfoldConfig, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is a loader only: use from_pretrained or layerfold.load")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, config=None, **kwargs: Any):
        kwargs.pop("trust_remote_code", None)  # nothing from the folder runs
        _refuse_quantization(kwargs.pop("quantization_config", None))
        hub = {name: kwargs[name] for name in _HUB_ARGUMENTS if kwargs.get(name) is not None}
        folder = _local_folder(pretrained_model_name_or_path, hub)
        checked = check_checkpoint(folder)
        target = _head_class(cls.auto_class, checked)
        if checked.renamed:  # layerfold 0.1's store names, which transformers cannot map: layerfold reads it
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            model = load(folder, dtype=None if dtype in (None, "auto") else _as_dtype(dtype))
            if cls.auto_class == "AutoModel":
                return model.base_model
            if type(model) is not target:
                raise LayerfoldError(f"{folder}: a checkpoint of layerfold 0.1 loads only as {type(model).__name__}")
            return model
        base = _base_config(checked, config, kwargs)
        model = target.from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            config=base,
            quantization_config=FoldQuantizationConfig(checked.config["fold_plan"]),
            **kwargs,
        )
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
        loaded.config._name_or_path = str(pretrained_model_name_or_path)
        return model


def _refuse_quantization(quantization_config) -> None:
    """A caller's own quantization config. None means none, and the fold's own (what its config stores, which tools
    such as lm-eval's HFLM pass back) is the fold quantizer's anyway."""
    if isinstance(quantization_config, dict):
        quantization_config = None if quantization_config.get("quant_method") == FOLD_METHOD else quantization_config
    if quantization_config is not None and not isinstance(quantization_config, FoldQuantizationConfig):
        name = type(quantization_config).__name__
        raise LayerfoldError(
            f"quantization_config ({name}) is not supported on a fold yet: load the fold, or export it "
            "(layerfold export) and quantise the plain model"
        )


def _as_dtype(dtype):
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _local_folder(name_or_path, hub: dict) -> Path:
    """The folder a name names: itself, or a Hub id's snapshot in the Hugging Face cache (fetched when allowed)."""
    subfolder = hub.get("subfolder") or ""
    if os.path.isdir(name_or_path):
        return Path(name_or_path) / subfolder
    try:
        config_file = transformers.utils.cached_file(str(name_or_path), CONFIG_NAME, **hub)
    except OSError as err:
        raise LayerfoldError(f"folded model not found: {name_or_path} ({first_line(err)})") from None
    return Path(config_file).parent


def _head_class(auto_class: str, checked) -> type:
    mapping = getattr(transformers, auto_class)._model_mapping
    try:
        return mapping[type(checked.base)]
    except KeyError:
        raise LayerfoldError(
            f"{checked.config['base_architecture']} has no {auto_class} model: this fold loads as "
            f"{checked.config['base_architecture']}"
        ) from None


def _base_config(checked, given, kwargs: dict) -> PreTrainedConfig:
    """The base architecture's config for ``from_pretrained``: the checkpoint's, with the overrides the caller gave
    (fields AutoConfig set on the LayerfoldConfig, a base config passed as ``config``, config keyword arguments,
    which are taken out of ``kwargs``)."""
    if isinstance(given, PreTrainedConfig) and not isinstance(given, LayerfoldConfig):
        if given.model_type != checked.base.model_type:
            raise LayerfoldError(f"config is a {given.model_type} config but the fold is a {checked.base.model_type}")
        base = copy.deepcopy(given)
    else:
        base = copy.deepcopy(checked.base)
        if isinstance(given, LayerfoldConfig):
            stored = LayerfoldConfig.from_dict(checked.config).to_dict()
            for key, value in given.to_dict().items():
                if key.startswith("_") or key in _FOLD_FIELDS or stored.get(key) == value:
                    continue
                if hasattr(base, key):
                    setattr(base, key, value)
            for private in ("_attn_implementation", "_experts_implementation"):  # from attn_implementation=...
                if getattr(given, private, None) is not None:
                    kwargs.setdefault(private[1:], getattr(given, private))
    for key in [k for k in kwargs if k not in _LOADING_ARGUMENTS]:
        if hasattr(base, key):
            setattr(base, key, kwargs.pop(key))
    return base


def _loader(auto_class: str) -> type:
    name = "Layerfold" + auto_class.removeprefix("Auto").removeprefix("Model")
    name = "LayerfoldModel" if name == "Layerfold" else name
    return type(name, (_LayerfoldAutoModel,), {"auto_class": auto_class, "__module__": __name__})


LOADERS = {auto_class: _loader(auto_class) for auto_class in AUTO_CLASSES if hasattr(transformers, auto_class)}
LayerfoldModel = LOADERS["AutoModel"]
LayerfoldForCausalLM = LOADERS["AutoModelForCausalLM"]
LayerfoldForMaskedLM = LOADERS["AutoModelForMaskedLM"]
LayerfoldForSequenceClassification = LOADERS["AutoModelForSequenceClassification"]


def register_auto_classes() -> None:
    """Make transformers' Auto classes load folded checkpoints (``import layerfold`` does this). Idempotent."""
    peft_dispatch()
    AutoConfig.register(LayerfoldConfig.model_type, LayerfoldConfig, exist_ok=True)
    for auto_class, loader in LOADERS.items():
        getattr(transformers, auto_class).register(LayerfoldConfig, loader, exist_ok=True)
    if FOLD_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FOLD_METHOD)(FoldQuantizationConfig)
    if FOLD_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FOLD_METHOD)(FoldQuantizer)


register_auto_classes()


register = renamed(register_auto_classes, "layerfold.register")  # the old name, kept working
