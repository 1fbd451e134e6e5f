"""Reading original models and writing/reading folded ones.

A folded checkpoint is a normal folder: ``model.safetensors`` (or, above ``--max-shard-size``, shards and
``model.safetensors.index.json``, as Hugging Face writes them) with every tensor stored once (aliases such as
tied embeddings are listed in the metadata), ``config.json`` holding the base model's config and the
plan, ``plan.yaml``, the tokenizer files, and ``modeling_layerfold.py`` so that transformers' Auto classes
load it with ``trust_remote_code=True``. Nothing is unpickled on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from . import __version__
from .checkpoint import DEFAULT_MAX_SHARD_BYTES, has_weights, load_all, read_metadata, write_tensors
from .errors import LayerfoldError
from .families import family_for_model_type, family_of
from .fold import apply_structure
from .modules import STATE_ATTRIBUTE, BasisLinear, TiedLinear, fold_state
from .plan import FoldPlan

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PLAN_NAME = "plan.yaml"
REMOTE_CODE_NAME = "modeling_layerfold.py"
ALIASES_KEY = "layerfold_aliases"
# Files a model folder carries besides its weights and config that a folded model still needs.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# ---- output directories ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` that replaces ``out`` only when the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LayerfoldError(f"output path exists and is not a directory: {out}")
    if out.exists() and not overwrite:
        raise LayerfoldError(f"output directory already exists: {out} (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    except OSError as err:
        raise LayerfoldError(f"cannot write output directory {out}: {err.strerror or err}") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, LayerfoldError):
            raise LayerfoldError(f"cannot write output directory {out}: {err.strerror or err}") from None
        raise


# ---- original models --------------------------------------------------------------------------------------
def _strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantised to plain float weights on load; let it save like any other model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _model_class(config) -> type:
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def source_config(path: Path) -> tuple[transformers.PretrainedConfig, type]:
    """The config and model class of an original model folder, checked: a readable config.json of a
    supported architecture, not a folded model."""
    if not (path / CONFIG_NAME).is_file():
        raise LayerfoldError(f"no config.json in {path}: not a Hugging Face model folder")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayerfoldError(f"cannot read {path / CONFIG_NAME}: {err}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "layerfold":
        raise LayerfoldError(f"{path} is already a folded model; fold the original model instead")
    family_for_model_type(str(model_type))
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return config, _model_class(config)


def load_source(path: str | Path, *, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load an original model from a local Hugging Face folder or a ``.gguf`` file, checking first that
    layerfold supports its architecture."""
    path = Path(path)
    if not path.exists():
        raise LayerfoldError(f"model path not found: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_file():
        raise LayerfoldError(f"not a model folder or .gguf file: {path}")
    config, model_class = source_config(path)
    try:
        model = model_class.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    except (OSError, ValueError) as err:
        raise LayerfoldError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None
    return model.eval()


def _load_gguf(path: Path) -> nn.Module:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LayerfoldError("reading .gguf files needs the gguf package: pip install 'layerfold[gguf]'") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
    )
    _strip_gguf_quantizer(model)
    family_of(model)
    return model.eval()


def copy_tokenizer(source: str | Path, out: str | Path) -> None:
    """Copy the tokenizer of an original model (a folder or a .gguf file) into ``out``."""
    source, out = Path(source), Path(out)
    if source.is_file() and source.suffix == ".gguf":
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer.save_pretrained(out)
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


# ---- folded checkpoints -----------------------------------------------------------------------------------
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


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once, and the other names under which a tensor appears."""
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
    # Tensors that only partly overlap another's storage are stored as copies of their own.
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage:
            tensors[name] = tensor.clone()
        seen_storage.add(ptr)
    return tensors, aliases


def save(
    model: nn.Module,
    path: str | Path,
    *,
    source: str | Path | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a folded model to ``path`` (atomically). ``source`` is the original model's folder or .gguf file,
    whose tokenizer is copied along; ``extra_files`` (name -> text) are written beside it, e.g. a report."""
    if fold_state(model) is None:
        raise LayerfoldError("the model is not folded: call layerfold.fold(model, plan) first")
    path = Path(path)
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        write_folded(model, tmp, source=source, max_shard_bytes=max_shard_bytes)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def write_folded(
    model: nn.Module,
    directory: str | Path,
    *,
    source: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a folded model's files into an existing ``directory`` (not atomically: ``save`` wraps this)."""
    directory = Path(directory)
    tensors, aliases = _unique_state(model)
    write_tensors(directory, tensors, max_shard_bytes=max_shard_bytes, metadata={ALIASES_KEY: json.dumps(aliases)})
    write_folded_config(model, directory, source=source)


def write_folded_config(model: nn.Module, directory: Path, *, source: str | Path | None = None) -> None:
    """Everything of a folded checkpoint but its weights: config, plan, remote code, generation config and
    the tokenizer. ``model`` may be on the meta device (a streamed fold)."""
    state = fold_state(model)
    config = {
        "model_type": "layerfold",
        "architectures": [_remote_class_name(state.base_architecture)],
        "auto_map": _auto_classes(state.base_architecture),
        "base_architecture": state.base_architecture,
        "base_config": state.base_config,
        "fold_plan": state.plan.to_dict(),
        "layerfold_version": __version__,
        "transformers_version": transformers.__version__,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    state.plan.save(directory / PLAN_NAME)
    (directory / REMOTE_CODE_NAME).write_text(_REMOTE_CODE.format(version=__version__))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(directory)
    if source is not None:
        copy_tokenizer(source, directory)


def _aliases(path: Path) -> dict[str, str]:
    return json.loads(read_metadata(path).get(ALIASES_KEY, "{}"))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a folded checkpoint's weight files, each stored tensor also under its aliases' names."""
    path = Path(path)
    aliases = _aliases(path)
    tensors = load_all(path)
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


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
from layerfold.hub import (  # noqa: F401
    LayerfoldConfig,
    LayerfoldForCausalLM,
    LayerfoldForMaskedLM,
    LayerfoldForSequenceClassification,
    LayerfoldModel,
)
"""


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LayerfoldError(f"folded model not found: {path}")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise LayerfoldError(f"no config.json in {path}: not a layerfold checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayerfoldError(f"cannot read {config_file}: {err}") from None
    if not isinstance(config, dict) or config.get("model_type") != "layerfold":
        raise LayerfoldError(f"{path} is not a layerfold checkpoint (its config.json has no layerfold model type)")
    if not has_weights(path):
        raise LayerfoldError(f"{path} has no {WEIGHTS_NAME} (nor shards with an index)")
    return config


def load(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a folded model from a layerfold checkpoint, without the original model."""
    path = Path(path)
    config = read_checkpoint_config(path)
    base_config = dict(config["base_config"])
    model_type = base_config.pop("model_type")
    family_for_model_type(model_type)
    base = CONFIG_MAPPING[model_type].from_dict(base_config)
    model_class = getattr(transformers, config["base_architecture"])
    plan = FoldPlan.from_dict(config["fold_plan"])
    with init_empty_weights(include_buffers=False):
        model = model_class(base)
    apply_structure(
        model,
        plan,
        base_config=config["base_config"],
        base_architecture=config["base_architecture"],
        initialize=False,
    )
    tensors = read_weights(path)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise LayerfoldError(f"{path / WEIGHTS_NAME} does not match its config: {str(err).splitlines()[0]}") from None
    # Re-tie: each alias becomes the very same Parameter object as its source, as in the original model.
    aliases = _aliases(path)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for alias, name in aliases.items():
        if alias in parameters and name in parameters:
            module_path, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_path), attr, parameters[name])
    if dtype is not None:
        model.to(dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.config._name_or_path = str(path)
    return model.eval()


def materialize(model: nn.Module) -> nn.Module:
    """Turn a folded model back into its plain architecture in place: every tied or factorised projection gets
    its own weight (shared + relaxation, or coefficients × basis, merged); the layer count stays as folded."""
    if fold_state(model) is None:
        return model
    layers = family_of(model).layer_list(model)
    for block in layers:
        for name, module in list(block.named_modules()):
            if not isinstance(module, (TiedLinear, BasisLinear)):
                continue
            weight = module.merged_weight().detach()
            bias = module._bias()
            out_features, in_features = weight.shape
            with torch.device(weight.device):
                if module.transposed:
                    plain = Conv1D(out_features, in_features)
                    plain.weight = nn.Parameter(weight.t().contiguous())
                else:
                    plain = nn.Linear(in_features, out_features, bias=bias is not None)
                    plain.weight = nn.Parameter(weight.contiguous())
            if bias is not None:
                plain.bias = nn.Parameter(bias.detach().clone())
            plain.to(weight.dtype)
            block.set_submodule(name, plain)
    delattr(model.base_model, STATE_ATTRIBUTE)
    return model


def export(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a folded checkpoint as a plain Hugging Face checkpoint (relaxations merged into per-layer weights)
    that loads without layerfold."""
    model = materialize(load(path))
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(path, tmp)
    return out


def is_folded_checkpoint(path: str | Path) -> bool:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "layerfold"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_any(path: str | Path) -> nn.Module:
    """A folded checkpoint (layerfold.load) or an original model folder or .gguf file (load_source)."""
    return load(path) if is_folded_checkpoint(path) else load_source(path)


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (folded or not) or of a .gguf file."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".gguf":
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=is_folded_checkpoint(path))
    except (OSError, ValueError, TypeError) as err:
        raise LayerfoldError(f"no usable tokenizer in {path}: {str(err).splitlines()[0]}") from None
