"""Original models: reading a Hugging Face folder or a ``.gguf`` file, checked before anything is built.

A config names only its family's own transformers model classes and sane sizes; nothing from the folder is run
(``trust_remote_code=False``). A folded checkpoint is refused here: fold the original.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..core.errors import LayerfoldError, first_line
from ..core.families import family_for_model_type, family_of

CONFIG_NAME = "config.json"
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
SENTENCE_TRANSFORMERS_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")
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


# ---- original models --------------------------------------------------------------------------------------
def _strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantised to plain float weights on load; let it save like any other model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# Config fields that set how much a model allocates when it is built. Each must be a positive integer; the sizes
# of a folded checkpoint must also fit its stored tensors (see ``check_checkpoint``).
LAYER_FIELDS = ("num_hidden_layers", "n_layer")
_SIZE_FIELDS = (
    *LAYER_FIELDS,
    "hidden_size",
    "n_embd",
    "n_head",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "n_inner",
    "ffn_dim",
    "word_embed_proj_dim",
)
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "type_vocab_size")
MAX_POSITIONS = 1 << 24  # BERT-like models allocate buffers of this length


def check_config_sizes(config: dict, where: str, *, largest_dimension: int | None = None) -> None:
    """Every size field is a positive integer; with ``largest_dimension`` (a folded checkpoint's largest stored
    tensor side), none is larger than the tensors could hold."""
    for name in _SIZE_FIELDS + _POSITION_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerfoldError(f"{where}.{name}: must be a positive integer, got {value!r}")
        if name in _POSITION_FIELDS:
            limit = MAX_POSITIONS
        elif name in LAYER_FIELDS:
            continue  # checked against the layers the weights hold
        else:
            limit = largest_dimension
        if limit is not None and value > limit:
            raise LayerfoldError(f"{where}.{name}: {value} is larger than the checkpoint's tensors allow (at most {limit})")


def model_class_for(name: object, model_type: str, where: str) -> type:
    """The transformers model class called ``name``, only if it is one of ``model_type``'s own model classes:
    a config never names arbitrary code to call."""
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        config_class = None
    if (
        not isinstance(cls, type)
        or not issubclass(cls, transformers.PreTrainedModel)
        or config_class is None
        or getattr(cls, "config_class", None) is not config_class
    ):
        raise LayerfoldError(f"{where}: {name!r} is not a {model_type} model class of transformers")
    return cls


def _model_class(config) -> type:
    for name in getattr(config, "architectures", None) or []:
        try:
            return model_class_for(name, config.model_type, "config.json architectures")
        except LayerfoldError:
            continue
    return transformers.AutoModel


def read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayerfoldError(f"cannot read {file}: {err}") from None


def source_config(path: Path) -> tuple[transformers.PretrainedConfig, type]:
    """The config and model class of an original model folder, checked: a readable config.json of a
    supported architecture with sane sizes, not a folded model."""
    if not (path / CONFIG_NAME).is_file():
        raise LayerfoldError(f"no config.json in {path}: not a Hugging Face model folder")
    raw = read_json(path / CONFIG_NAME)
    if not isinstance(raw, dict):
        raise LayerfoldError(f"{path / CONFIG_NAME}: not a JSON object")
    model_type = raw.get("model_type")
    if model_type == "layerfold":
        raise LayerfoldError(f"{path} is already a folded model; fold the original model instead")
    family_for_model_type(str(model_type))
    check_config_sizes(raw, f"{path / CONFIG_NAME}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise LayerfoldError(f"cannot read {path / CONFIG_NAME}: {first_line(err)}") from None
    if (path / SENTENCE_TRANSFORMERS_MODULES).is_file():
        # sentence-transformers loads its Transformer module with AutoModel: the base model, whatever head
        # config.json names (all-mpnet-base-v2 says MPNetForMaskedLM but ships no LM head weights).
        return config, transformers.AutoModel
    return config, _model_class(config)


def concrete_class(model_class: type, config) -> type:
    """The model class itself: ``AutoModel`` (what ``source_config`` gives for a sentence-transformers folder)
    becomes the architecture's base model class (``BertModel``), whose ``_from_config`` builds it."""
    if model_class is transformers.AutoModel:
        return transformers.AutoModel._model_mapping[type(config)]
    return model_class


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
        model = model_class.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", trust_remote_code=False
        )
    except (OSError, ValueError, TypeError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError,
            SafetensorError) as err:  # fmt: skip
        if isinstance(err, pickle.UnpicklingError):  # torch's weights-only loader refused it; nothing ran
            raise LayerfoldError(f"cannot load model from {path}: its pickled weights hold more than tensors "
                                 f"({first_line(err).split('. ')[0]}); not unpickled, since that could run code. Convert "
                                 "it to safetensors where you trust it") from None  # fmt: skip
        raise LayerfoldError(f"cannot load model from {path}: {first_line(err)}") from None  # e.g. truncated
    return model.eval()


def skeleton_of(path: Path) -> nn.Module:
    """An original model folder's model on the meta device: its structure and shapes, no weights read."""
    config, model_class = source_config(path)
    try:
        with init_empty_weights(include_buffers=False):
            return concrete_class(model_class, config)._from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise LayerfoldError(f"cannot build the model of {path}: {first_line(err)}") from None


def _load_gguf(path: Path) -> nn.Module:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LayerfoldError("reading .gguf files needs the gguf package: pip install 'layerfold[gguf]'") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
    except LayerfoldError:
        raise
    except Exception as err:  # the gguf reader raises many kinds on a file that is not GGUF
        raise LayerfoldError(f"cannot read {path} as a GGUF model: {first_line(err)}") from None
    _strip_gguf_quantizer(model)
    family_of(model)
    return model.eval()


def copy_side_files(source: str | Path, out: str | Path) -> None:
    """Copy what a model folder carries besides its weights and config into ``out``: the tokenizer (also of a
    .gguf file) and sentence-transformers' files, so that ``SentenceTransformer(out)`` pools, normalises and
    truncates as the original does."""
    source, out = Path(source), Path(out)
    if source.is_file() and source.suffix == ".gguf":
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer.save_pretrained(out)
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    copy_sentence_transformers_files(source, out)


def copy_sentence_transformers_files(source: Path, out: Path) -> None:
    """``modules.json``, its settings files and the folders of the modules after the transformer (pooling,
    normalisation, dense layers). A module folder that does not exist (Normalize keeps no files, and copies
    of the model often lack its folder) is created empty, as sentence-transformers expects it."""
    if not (source / SENTENCE_TRANSFORMERS_MODULES).is_file():
        return
    listing = source / SENTENCE_TRANSFORMERS_MODULES
    try:
        paths = [str(m.get("path", "")) for m in json.loads(listing.read_text(encoding="utf-8"))]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
        paths = None
    if paths is None or any(Path(p).is_absolute() or ".." in Path(p).parts for p in paths):
        # The model itself is fine; only the sentence-transformers wrapper is not carried over.
        print(f"layerfold: note: {listing}: not a sentence-transformers module list inside the folder; not copied",
              file=sys.stderr)  # fmt: skip
        return
    for name in (SENTENCE_TRANSFORMERS_MODULES, *SENTENCE_TRANSFORMERS_FILES):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    for path in filter(None, paths):  # "" is the transformer itself: the folder's own model
        if (source / path).is_dir():
            shutil.copytree(source / path, out / path, dirs_exist_ok=True)
        else:
            (out / path).mkdir(parents=True, exist_ok=True)
