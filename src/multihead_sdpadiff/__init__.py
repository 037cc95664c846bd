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
from .layers_grouped import GroupedDiffAttn
from .layers_v2 import MultiheadDiffAttnV2
from .masks import causal_mask
from .models import DiffTransformer, DiffTransformerConfig
from .ops import IMPLS, choose_impl, diff_attention, diff_attention_varlen
from .ops.grouped import IMPLS_GROUPED, grouped_diff_attention
from .ops.v2 import IMPLS_V2, diff_attention_v2, diff_attention_v2_varlen
from .phi4flash import Phi4FlashDiffAttention
from .rotary import RotaryEmbedding, apply_rotary_emb
from .timm import VisionDiffAttn

__version__ = "0.2.0"

__all__ = [
    "DiffTransformer",
    "DiffTransformerConfig",
    "GroupedDiffAttn",
    "IMPLS",
    "IMPLS_GROUPED",
    "IMPLS_V2",
    "KVCache",
    "MultiheadDiffAttn",
    "MultiheadDiffAttnV2",
    "MultiheadSdpaDiff1",
    "MultiheadSdpaDiff2",
    "MultiheadSdpaDiff3",
    "MultiheadSdpaDiff4",
    "Phi4FlashDiffAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "VisionDiffAttn",
    "__version__",
    "apply_rotary_emb",
    "causal_mask",
    "choose_impl",
    "diff_attention",
    "diff_attention_v2",
    "diff_attention_v2_varlen",
    "diff_attention_varlen",
    "grouped_diff_attention",
    "lambda_init_fn",
]
