"""Differential attention (Differential Transformer, arXiv 2410.05258) on PyTorch SDPA."""

from .cache import KVCache
from .layers import (
    MultiheadDiffAttn,
    MultiheadSdpaDiff1,
    MultiheadSdpaDiff2,
    MultiheadSdpaDiff3,
    MultiheadSdpaDiff4,
    RMSNorm,
    lambda_init_fn,
)
from .masks import causal_mask
from .models import DiffTransformer, DiffTransformerConfig
from .ops import IMPLS, choose_impl, diff_attention
from .rotary import RotaryEmbedding, apply_rotary_emb

__version__ = "0.2.0"

__all__ = [
    "DiffTransformer",
    "DiffTransformerConfig",
    "IMPLS",
    "KVCache",
    "MultiheadDiffAttn",
    "MultiheadSdpaDiff1",
    "MultiheadSdpaDiff2",
    "MultiheadSdpaDiff3",
    "MultiheadSdpaDiff4",
    "RMSNorm",
    "RotaryEmbedding",
    "__version__",
    "apply_rotary_emb",
    "causal_mask",
    "choose_impl",
    "diff_attention",
    "lambda_init_fn",
]
