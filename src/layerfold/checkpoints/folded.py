"""Folded checkpoints: writing, validating, reading and exporting them (original models: ``layerfold.checkpoints.originals``).

A folded checkpoint is a normal folder: ``model.safetensors`` (or, above ``--max-shard-size``, shards and
``model.safetensors.index.json``, as Hugging Face writes them) with every tensor stored once (aliases such as
tied embeddings are listed in the metadata), ``config.json`` holding the base model's config and the
plan, ``plan.yaml``, the tokenizer files, and ``modeling_layerfold.py`` (for ``trust_remote_code=True`` where
layerfold is installed but not imported; after ``import layerfold`` the Auto classes need no flag: ``hub``).
Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import torch
import transformers
from torch import nn

from .. import __version__
from ..core.tensor_files import (
    DEFAULT_MAX_SHARD_BYTES,
    has_weights,
    parse_size,
    write_tensors,
)
from ..engine.execute import sync_plan
from ..core.errors import LayerfoldError, first_line
from ..core.families import family_of, plain_projection
from .modelcard import CARD_NAME, FOLD_TAG, card_tags, export_card, fold_card
from ..operations.base import FoldedProjection
from ..operations.pruning import plain_widths
from ..core.report import parameter_breakdown, weight_bytes
from .output_guard import atomic_output_dir, check_output
from .originals import (  # noqa: F401 (the original-model readers are offered here too, as before)
    CONFIG_NAME,
    LAYER_FIELDS,
    TOKENIZER_FILES,
    check_config_sizes,
    copy_side_files,
    load_source,
    model_class_for,
    read_json,
    skeleton_of,
    source_config,
)
from ..core.store import FORMAT_KEY, FORMAT_VERSION, STATE_ATTRIBUTE, fold_state

from .reading import (  # noqa: F401 (offered here too, as before)
    WEIGHTS_NAME,
    PLAN_NAME,
    REMOTE_CODE_NAME,
    ALIASES_KEY,
    NOT_WITHOUT_LAYERFOLD,
    GUARD,
    guarded,
    unguarded,
    read_weights,
    read_checkpoint_config,
    CheckedCheckpoint,
    checkpoint_format,
    format_1_names,
    check_checkpoint,
    skeleton,
)


def _auto_classes(base_architecture: str) -> dict[str, str]:
    auto_map = {
        "AutoConfig": "modeling_layerfold.LayerfoldConfig",
        "AutoModel": "modeling_layerfold.LayerfoldModel",
    }
    model_class = getattr(transformers, base_architecture, None)
    for auto_name, remote in (
        ("AutoModelForCausalLM", "LayerfoldForCausalLM"),
        ("AutoModelForMaskedLM", "LayerfoldForMaskedLM"),
        ("AutoModelForSequenceClassification", "LayerfoldForSequenceClassification"),
    ):
        mapping = getattr(transformers, auto_name)._model_mapping
        if model_class is not None and model_class in mapping.values():
            auto_map[auto_name] = f"modeling_layerfold.{remote}"
    return auto_map


def _unique_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once, and the other names under which a tensor appears. Which names are
    one tensor comes from the model; the values from ``state_dict`` when given (Trainer passes one)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
            tensors[name] = tensor.detach().contiguous()
    if state_dict is not None:
        missing = sorted(set(tensors) - set(state_dict))
        if missing:
            raise LayerfoldError(f"cannot save the folded model: the state dict given lacks {missing[0]}")
        for name, tensor in tensors.items():
            given = state_dict[name]
            if tuple(given.shape) != tuple(tensor.shape):
                raise LayerfoldError(f"cannot save the folded model: {name} is {tuple(given.shape)} in the state dict")
            tensors[name] = given.detach().to(tensor.dtype).contiguous()
    # Tensors that only partly overlap another's storage are stored as copies of their own.
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage:
            tensors[name] = tensor.clone()
        seen_storage.add(ptr)
    return tensors, aliases


# Weight files a folder may hold from an earlier save, which would be read instead of (or mixed with) new ones.
_STALE_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def _save_pretrained_folded(
    self: nn.Module,
    save_directory: str | Path,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: bool = False,
    **_ignored,
) -> None:
    """``save_pretrained`` of a folded model (bound to it by ``install_save_hook``): the plain method would write
    the base architecture's config beside the folded tensor names, a folder that reloads with random weights.
    This writes a layerfold checkpoint instead (safetensors always), which ``layerfold.load`` and
    ``from_pretrained(..., trust_remote_code=True)`` reload bit for bit. Trainer.save_model and
    SentenceTransformer.save call this."""
    state = fold_state(self)
    if state is None or type(self).__name__ != state.base_architecture:
        raise LayerfoldError(
            f"this {type(self).__name__} is part of a folded {state.base_architecture if state else 'model'}: "
            "save the whole model (model.save_pretrained or layerfold.save)"
        )
    if push_to_hub:
        raise LayerfoldError("push_to_hub: layerfold saves folded models locally; upload the folder yourself")
    if not is_main_process:
        return
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise LayerfoldError(f"cannot save the folded model: {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        if _STALE_WEIGHTS.match(stale.name) and stale.is_file():
            stale.unlink()
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(str(max_shard_size))
    write_folded(self, directory, max_shard_bytes=max_bytes, state_dict=state_dict)


def peft_dispatch() -> None:
    """Where PEFT is in use (imported), let its own loaders put adapters on folded projections
    (``adapters.install_peft_dispatch``); PEFT is not imported for this. Run by ``import layerfold`` and by every
    load of a fold."""
    if "peft" in sys.modules:
        try:
            from . import adapters  # noqa: F401 (installs the dispatch on import)
        except ImportError:
            pass


def install_save_hook(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write a layerfold checkpoint (see ``_save_pretrained_folded``)."""
    model.save_pretrained = types.MethodType(_save_pretrained_folded, model)
    base = getattr(model, "base_model", model)
    if base is not model:
        base.save_pretrained = types.MethodType(_save_pretrained_folded, base)


def save(
    model: nn.Module,
    path: str | Path,
    *,
    source: str | Path | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    figures: dict | None = None,
) -> Path:
    """Write a folded model to ``path`` (atomically). ``source`` is the original model's folder or .gguf file,
    whose tokenizer is copied along; ``extra_files`` (name -> text) are written beside it, e.g. a report;
    ``figures`` (name -> value: what was measured) go into the model card with the sizes."""
    if fold_state(model) is None:
        raise LayerfoldError("the model is not folded: call layerfold.fold(model, plan) first")
    path = Path(path)
    with atomic_output_dir(path, overwrite=overwrite, inputs={"original model": source}) as tmp:
        write_folded(model, tmp, source=source, max_shard_bytes=max_shard_bytes, figures=figures, name=path.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def write_folded(
    model: nn.Module,
    directory: str | Path,
    *,
    source: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    state_dict: dict[str, torch.Tensor] | None = None,
    figures: dict | None = None,
    name: str | None = None,
) -> None:
    """Write a folded model's files into an existing ``directory`` (not atomically: ``save`` wraps this; ``name``:
    the folder's final name, for the model card)."""
    directory = Path(directory)
    sync_plan(model)
    tensors, aliases = _unique_state(model, state_dict)
    write_tensors(directory, tensors, max_shard_bytes=max_shard_bytes, metadata=weights_metadata(aliases))
    write_folded_config(model, directory, source=source, figures=figures, name=name)


def weights_metadata(aliases: dict[str, str]) -> dict[str, str]:
    """The metadata of a folded checkpoint's weight files: its alias table and format version."""
    return {ALIASES_KEY: json.dumps(aliases), FORMAT_KEY: str(FORMAT_VERSION)}


def write_folded_config(
    model: nn.Module,
    directory: Path,
    *,
    source: str | Path | None = None,
    figures: dict | None = None,
    name: str | None = None,
) -> None:
    """Everything of a folded checkpoint but its weights: config, plan, remote code, generation config, the
    tokenizer and the model card (written after the weights, whose size it gives). ``model`` may be on the meta
    device (a streamed fold)."""
    state = fold_state(model)
    config = {
        "model_type": "layerfold",
        "architectures": [_remote_class_name(state.base_architecture)],
        "auto_map": _auto_classes(state.base_architecture),
        "base_architecture": state.base_architecture,
        "base_config": guarded(state.base_config),
        "fold_plan": state.plan.to_dict(),
        FORMAT_KEY: FORMAT_VERSION,
        "layerfold_version": __version__,
        "transformers_version": transformers.__version__,
        **GUARD,  # also here: a class of another model type reads the top level as its config
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    state.plan.save(directory / PLAN_NAME)
    (directory / REMOTE_CODE_NAME).write_text(_REMOTE_CODE.format(version=__version__))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(directory)
    if source is not None:
        copy_side_files(source, directory)
    write_card(
        directory,
        fold_card(
            name=name or directory.name, plan=state.plan, base_architecture=state.base_architecture,
            base_config=state.base_config, source=source,
            refolded=source is not None and is_folded_checkpoint(source),
            figures=_fold_figures(model, directory, figures),
        ),
    )  # fmt: skip


def _fold_figures(model: nn.Module, directory: Path, figures: dict | None) -> dict:
    shown = {"unique parameters": parameter_breakdown(model)["total"]}
    if has_weights(directory):
        shown["weights on disk (bytes)"] = weight_bytes(directory)
    return {**shown, **(figures or {})}


def write_card(directory: Path, text: str) -> None:
    """Write the model card, unless the folder holds a README.md that is not one of layerfold's (a folder the
    user saves into with ``save_pretrained``)."""
    card = directory / CARD_NAME
    if card.exists() and FOLD_TAG not in card_tags(directory):
        return
    card.write_text(text, encoding="utf-8")


def _remote_class_name(base_architecture: str) -> str:
    for suffix, name in (
        (("ForCausalLM", "LMHeadModel"), "LayerfoldForCausalLM"),
        (("ForMaskedLM",), "LayerfoldForMaskedLM"),
        (("ForSequenceClassification",), "LayerfoldForSequenceClassification"),
    ):
        if base_architecture.endswith(suffix):
            return name
    return "LayerfoldModel"


_REMOTE_CODE = """\
# Written by layerfold {version}. It lets transformers' Auto classes load this folder with
# trust_remote_code=True; the model is rebuilt by layerfold.load, so layerfold must be installed.
from layerfold.checkpoints.auto_classes import (  # noqa: F401
    LayerfoldConfig,
    LayerfoldForCausalLM,
    LayerfoldForMaskedLM,
    LayerfoldForSequenceClassification,
    LayerfoldModel,
)
"""


def load(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a folded model from a layerfold checkpoint, without the original model. The checkpoint is
    validated first (``check_checkpoint``); nothing is unpickled and no code from the folder runs."""
    path = Path(path)
    model, checked = skeleton(path)
    tensors = read_weights(path, checked.aliases, checked.renamed)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise LayerfoldError(f"{path / WEIGHTS_NAME} does not match its config: {first_line(err)}") from None
    # Re-tie: each alias becomes the very same Parameter object as its source, as in the original model.
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for alias, name in checked.aliases.items():
        if alias in parameters and name in parameters:
            module_path, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_path), attr, parameters[name])
    if dtype is not None:
        model.to(dtype)
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(path)
        except (OSError, ValueError, TypeError) as err:
            raise LayerfoldError(f"{path / 'generation_config.json'}: {first_line(err)}") from None
    model.config._name_or_path = str(path)
    install_save_hook(model)
    peft_dispatch()
    return model.eval()


def materialize(model: nn.Module) -> nn.Module:
    """Turn a folded model back into its plain architecture in place: every tied or factorised projection gets
    its own weight (shared + relaxation, or coefficients × basis, merged); the layer count stays as folded."""
    state = fold_state(model)
    if state is None:
        return model
    if state.plan.prunes():  # the config states the pruned widths (narrower layers padded with zeros)
        plain_widths(model, family_of(model))
    layers = family_of(model).layer_list(model)
    for block in layers:
        for name, module in list(block.named_modules()):
            if not isinstance(module, FoldedProjection):
                continue
            weight = module.merged_weight().detach().clone()  # tied layers without relaxation share a tensor
            bias = module.merged_bias()
            bias = None if bias is None else bias.detach().clone()
            plain = plain_projection(weight, bias, transposed=module.transposed)
            block.set_submodule(name, plain)
    delattr(model.base_model, STATE_ATTRIBUTE)
    for module in (model, model.base_model):  # plain again: the standard save_pretrained is right
        module.__dict__.pop("save_pretrained", None)
    return model


def export(path: str | Path, out: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a folded checkpoint as a plain Hugging Face checkpoint (relaxations merged into per-layer weights)
    that loads without layerfold, in ``dtype`` if given (default: as stored)."""
    check_output(out, {"folded model": path}, overwrite=overwrite)
    folded = load(path)
    plan = fold_state(folded).plan  # read before materialize removes it
    model = materialize(folded)
    if dtype is not None:
        model.to(dtype)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite, inputs={"folded model": path}) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(path, tmp)
        figures = {"parameters": parameter_breakdown(model)["total"], "weights on disk (bytes)": weight_bytes(tmp)}
        card = export_card(name=out.name, folded=Path(path), plan=plan, architecture=type(model).__name__,
                           dtype=str(next(model.parameters()).dtype).removeprefix("torch."), figures=figures)  # fmt: skip
        write_card(tmp, card)
    return out


def is_folded_checkpoint(path: str | Path) -> bool:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "layerfold"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def model_class_of(path: str | Path) -> type | None:
    """The model class a path would load as, read from its config alone (None when the config does not say)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM  # GGUF files here are causal LMs
    if is_folded_checkpoint(path):
        return check_checkpoint(path).model_class
    if not path.is_dir():
        return None
    model_class = source_config(path)[1]
    return None if model_class is transformers.AutoModel else model_class


def load_any(path: str | Path) -> nn.Module:
    """A folded checkpoint (layerfold.load) or an original model folder or .gguf file (load_source)."""
    return load(path) if is_folded_checkpoint(path) else load_source(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (folded or not) or of a .gguf file. Never runs code from the folder
    (``trust_remote_code=False``); a folded checkpoint's tokenizer is read with its base model's config."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        options = {}
        if is_folded_checkpoint(path):
            options["config"] = check_checkpoint(path).base
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, **options)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise LayerfoldError(f"no usable tokenizer in {path}: {first_line(err)}") from None
