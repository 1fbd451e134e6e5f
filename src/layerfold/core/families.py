"""Where each supported architecture keeps its stack of blocks and the linear projections inside a block.

Adding a family is one ``register_family(...)`` call: the ``model_type`` from its config, the path of the block
list relative to ``model.base_model``, and the projection paths relative to one block, split into attention
and MLP. Projections may be ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored transposed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import LayerfoldError, renamed

ATTENTION = "attention"
MLP = "mlp"


@dataclass(frozen=True)
class Family:
    """What layerfold knows of one architecture; every fact about a family is here."""

    model_type: str
    layers: str  # path of the nn.ModuleList of blocks, relative to model.base_model
    attention: tuple[str, ...]  # projection paths relative to a block
    mlp: tuple[str, ...]
    final_norm: str = ""  # a causal LM's norm after the last block, relative to model.base_model
    no_head_pruning: str = ""  # why prune-heads cannot cut this family's heads ("" when it can)
    head_size_in_config: bool = False  # the config states head_dim (attention and rotary embeddings read it)

    @property
    def projections(self) -> tuple[str, ...]:
        return self.attention + self.mlp

    def kind_of(self, projection: str) -> str:
        return ATTENTION if projection in self.attention else MLP

    def shared_projections(self, share: str) -> tuple[str, ...]:
        """The projections a plan's ``share`` setting ties across a group."""
        return {"all": self.projections, ATTENTION: self.attention, MLP: self.mlp}[share]

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers.rpartition(".")
        parent = model.base_model.get_submodule(parent_path) if parent_path else model.base_model
        setattr(parent, name, layers)


FAMILIES: dict[str, Family] = {}


def register_family(model_type: str, layers: str, attention: tuple[str, ...], mlp: tuple[str, ...], **facts) -> Family:
    """Add a family: its blocks, its projections and the other ``Family`` facts by keyword."""
    family = Family(model_type, layers, tuple(attention), tuple(mlp), **facts)
    FAMILIES[model_type] = family
    return family


_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
for _model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
    register_family(_model_type, "layers", _LLAMA_ATTENTION, _LLAMA_MLP, final_norm="norm", head_size_in_config=True)
register_family("phi3", "layers", ("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp.gate_up_proj", "mlp.down_proj"),
                final_norm="norm", no_head_pruning="Phi-3 fuses q, k and v in one projection (qkv_proj)")  # fmt: skip
register_family("gpt2", "h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"), final_norm="ln_f",
                no_head_pruning="GPT-2 fuses q, k and v in one projection (c_attn)")  # fmt: skip
register_family(
    "gpt_neox",
    "layers",
    ("attention.query_key_value", "attention.dense"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    final_norm="final_layer_norm",
    no_head_pruning="GPT-NeoX fuses q, k and v in one projection (query_key_value)",
)
register_family(
    "opt",
    "decoder.layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    ("fc1", "fc2"),
    final_norm="decoder.final_layer_norm",
)
_BERT_ATTENTION = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)
_BERT_MLP = ("intermediate.dense", "output.dense")
for _model_type in ("bert", "roberta"):
    register_family(_model_type, "encoder.layer", _BERT_ATTENTION, _BERT_MLP)
# MPNet (all-mpnet-base-v2): BERT's block with the attention projections under attention.attn; the relative
# position bias is one table for the whole encoder, outside the blocks.
register_family("mpnet", "encoder.layer", ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"),
                _BERT_MLP, no_head_pruning="MPNet's relative-position bias has one slice per head, shared by every layer")  # fmt: skip


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for_model_type(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise LayerfoldError(
            f"unsupported architecture: model type '{model_type}' (supported: {', '.join(supported_model_types())})"
        ) from None


def family_of(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        raise LayerfoldError(f"not a Hugging Face transformers model: {type(model).__name__}")
    return family_for_model_type(config.model_type)


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (in, out); nn.Linear as (out, in)."""
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The projection's weight in nn.Linear layout (out, in)."""
    return module.weight.t() if is_transposed(module) else module.weight


def plain_projection(weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool) -> nn.Module:
    """An nn.Linear, or GPT-2's Conv1D when ``transposed``, holding ``weight`` (nn.Linear layout, out×in) and
    ``bias`` as its own parameters, in the weight's dtype and device: the inverse of ``linear_weight``."""
    out_features, in_features = weight.shape
    with torch.device(weight.device):
        if transposed:
            plain = Conv1D(out_features, in_features)
            plain.weight = nn.Parameter(weight.t().contiguous())
        else:
            plain = nn.Linear(in_features, out_features, bias=bias is not None)
            plain.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        plain.bias = nn.Parameter(bias)
    return plain.to(weight.dtype)


def projection_shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = linear_weight(module).shape
    return out_features, in_features


register = renamed(register_family, "layerfold.core.families.register")  # the old name, kept working
