"""Models built from the package's layers: a small DiffTransformer language model."""

from .attention import ATTENTIONS, LayerAttention, StandardAttention, attention_maps
from .transformer import CausalLMOutput, DiffTransformer, DiffTransformerConfig, SwiGLU

__all__ = [
    "ATTENTIONS",
    "CausalLMOutput",
    "DiffTransformer",
    "DiffTransformerConfig",
    "LayerAttention",
    "StandardAttention",
    "SwiGLU",
    "attention_maps",
]
