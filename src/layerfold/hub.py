"""What a folded checkpoint's ``modeling_layerfold.py`` imports, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (or ``AutoModel`` for encoders) works.

The config's model type is ``layerfold``, so transformers without ``trust_remote_code`` refuses the folder
instead of silently loading a model with missing weights. The model classes hand loading to
``layerfold.load``, which returns the base architecture's own class (e.g. ``LlamaForCausalLM``) with its
folded modules, so ``generate()`` and every tool that expects that class keep working.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, PreTrainedModel

from .io import load


class LayerfoldConfig(PreTrainedConfig):
    model_type = "layerfold"

    base_architecture: str | None = None
    base_config: dict | None = None
    fold_plan: dict | None = None
    layerfold_version: str | None = None


class _LayerfoldAutoModel(PreTrainedModel):
    config_class = LayerfoldConfig
    base_model_prefix = "model"

    def __init__(self, config: LayerfoldConfig, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is a loader only: use from_pretrained or layerfold.load")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, **kwargs: Any):
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        model = load(pretrained_model_name_or_path, dtype=None if dtype in (None, "auto") else dtype)
        return cls._select(model)

    @classmethod
    def _select(cls, model):
        return model


class LayerfoldModel(_LayerfoldAutoModel):
    """``AutoModel``: the base model without a head (as transformers returns for any checkpoint)."""

    @classmethod
    def _select(cls, model):
        return model.base_model


class LayerfoldForCausalLM(_LayerfoldAutoModel):
    pass


class LayerfoldForMaskedLM(_LayerfoldAutoModel):
    pass


class LayerfoldForSequenceClassification(_LayerfoldAutoModel):
    pass
