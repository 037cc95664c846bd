"""Phi-4-mini-flash-reasoning's differential attention block (SambaY; Ren et al., arXiv 2507.06607).

The block is V1 differential attention in this library's pairing, with a fused ``Wqkv`` (bias),
``out_proj`` (bias), no RoPE, and two ways of getting keys and values:

* a self-attention layer projects q, k and v (optionally over a sliding window of ``W`` keys), and
  may write them to a :class:`~multihead_sdpadiff.KVCache`;
* a YOCO "cross" layer (``yoco_cross=True``) projects only q and attends, with full causal
  attention, to the cache that another (full-attention) layer wrote. It never writes.

The sliding window is the op's ``window = (W - 1, 0)`` (bottom-right aligned, so it holds with a
cache too): ``chunked`` and ``triton`` skip the key blocks outside the band, so a sliding layer
costs O(L · W), and no (L, Lk) band mask is built. :func:`sliding_window_mask` states the same band
as a bool mask, for analysis and tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache, transaction
from .layers import RMSNorm, _check_positive_int, impl_property, lambda_init_fn, reparameterized_lambda
from .masks import prepare_mask
from .ops import IMPLS, diff_attention

__all__ = ["Phi4FlashDiffAttention", "sliding_window_mask"]


def sliding_window_mask(lq: int, lk: int, window: int, device=None) -> torch.Tensor:
    """Bool ``(lq, lk)``: True where query ``j`` (the last ``lq`` of ``lk`` positions) may see key ``t``
    under a window of ``window`` keys, ``j + lk - lq - window < t`` (itself and ``window - 1`` before;
    transformers' ``sliding_window``, flash-attn's ``window_size = (window - 1, 0)``). Causality is
    not included: combine it with ``is_causal``."""
    rows = torch.arange(lq, device=device).unsqueeze(1)
    cols = torch.arange(lk, device=device).unsqueeze(0)
    return cols > rows + (lk - lq) - window


class Phi4FlashDiffAttention(nn.Module):
    """SambaY's differential attention layer with Phi-4-mini-flash's weight names.

    Args:
        hidden_size: E (2560 in Phi-4-mini-flash-reasoning).
        num_heads: attention heads (40), of width ``head_dim = hidden_size / num_heads`` (64). Heads
            ``2i`` and ``2i + 1`` are the two maps of differential head ``i`` (even = map 1).
        num_kv_heads: kv heads (20); kv heads ``2g`` / ``2g + 1`` are group ``g``'s keys for map 1 /
            map 2, and its value is ``[v[2g] | v[2g+1]]``. Differential head ``i`` uses group
            ``i // (num_heads / num_kv_heads)``.
        layer_idx: the 0-based index among *all* decoder layers (Mamba layers included):
            ``lambda_init = 0.8 − 0.6·exp(−0.3·layer_idx)``.
        sliding_window: ``W`` (512 in the model's sliding layers) or None for full attention.
        yoco_cross: a KV-sharing layer: ``Wqkv`` projects only q, and :meth:`forward` reads ``cache``
            (written by another layer) without writing it.
        bf16_attention: cast q, k, v and λ to bfloat16 before the attention, as the shipped code does
            whatever the input dtype (the output is cast back). Default False: float32/float64 exact.
        impl: the V1 strategy, a name from :data:`~multihead_sdpadiff.IMPLS`.

    Parameters: ``Wqkv`` (E → E + 2·num_kv_heads·head_dim, or E → E for a cross layer) and
    ``out_proj`` (E → E), both with bias; ``lambda_q1``, ``lambda_k1``, ``lambda_q2``,
    ``lambda_k2`` of shape ``(head_dim,)``; ``subln.weight`` of shape ``(2·head_dim,)``
    (eps fixed at 1e-5, normalised in float32 and cast back before the weight).
    """

    def __init__(
        self,
        hidden_size: int = 2560,
        num_heads: int = 40,
        num_kv_heads: int = 20,
        *,
        layer_idx: int,
        sliding_window: int | None = None,
        yoco_cross: bool = False,
        bf16_attention: bool = False,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            _check_positive_int(name, value)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int (index among all decoder layers), got {type(layer_idx).__name__}")
        if layer_idx < 0:
            raise ValueError(f"layer_idx must be >= 0 (index among all decoder layers), got {layer_idx}")
        if num_heads % 2 or num_kv_heads % 2:
            raise ValueError(f"num_heads {num_heads} and num_kv_heads {num_kv_heads} must be even (two maps per head)")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if sliding_window is not None:
            _check_positive_int("sliding_window", sliding_window)
            if yoco_cross:
                raise ValueError("a yoco_cross layer attends with full causal attention: sliding_window must be None")
        for name, value in (("yoco_cross", yoco_cross), ("bf16_attention", bf16_attention)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")

        self.hidden_size = self.embed_dim = hidden_size
        self.num_heads = num_heads // 2  # differential heads
        self.num_kv_heads = num_kv_heads // 2  # kv groups
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.yoco_cross = yoco_cross
        self.bf16_attention = bf16_attention
        self.impl = impl
        self.lambda_init = lambda_init_fn(layer_idx)

        kw = {"device": device, "dtype": dtype}
        kv_size = num_kv_heads * self.head_dim
        self.Wqkv = nn.Linear(hidden_size, hidden_size if yoco_cross else hidden_size + 2 * kv_size, bias=True, **kw)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=True, **kw)
        lam_kw = {"device": device, "dtype": dtype or torch.float32}
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.subln = RMSNorm(2 * self.head_dim, eps=1e-5, **kw)
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    impl = impl_property(IMPLS)

    def lambda_full(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, 0-dim, in float32 (float64 for float64 parameters)."""
        return reparameterized_lambda(self)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> torch.Tensor:
        """Args:
            x: ``(B, L, hidden_size)``.
            attn_mask: optional bool (True = may attend) or additive float mask broadcastable to
                ``(B, num_heads / 2, L, Lk)``, ``Lk = len(cache) + L`` for a self layer with a cache,
                ``len(cache)`` for a cross layer, ``L`` otherwise. The causal mask (bottom-right: the
                ``L`` queries are the last ``L`` positions) and, for a sliding layer, the window
                apply too.
            cache: a self layer appends its keys ``(B, num_kv_heads, L, d)`` and values
                ``(B, num_kv_heads / 2, L, 2d)`` and attends over everything cached. A cross layer
                needs it: the cache another layer wrote, holding at least ``L`` positions (this
                step's tokens included); it is read, never written.

        Returns ``(B, L, hidden_size)``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be (B, L, hidden_size={self.hidden_size}), got shape {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        b, length, e = x.shape
        d = self.head_dim
        if self.yoco_cross:
            if cache is None or len(cache) < length:
                raise ValueError(f"a yoco_cross layer reads the shared KVCache of another layer, which must hold at "
                                 f"least L={length} positions; got {'None' if cache is None else len(cache)}")
            lk = len(cache)
        else:
            lk = length + (len(cache) if cache is not None else 0)
        mask = prepare_mask(attn_mask, is_causal=True, batch=b, heads=self.num_heads, lq=length, lk=lk,
                            dtype=x.dtype, device=x.device).tensor  # validated before any cache write

        with transaction(None if self.yoco_cross else cache):  # a call that raises leaves the cache as it was
            proj = self.Wqkv(x)
            q = proj[..., :e].view(b, length, 2 * self.num_heads, d).transpose(1, 2)  # (B, 2H, L, d)
            if self.yoco_cross:
                k, v = cache.keys(), cache.values()  # (B, 2Hkv, Lk, d), (B, Hkv, Lk, 2d)
            else:
                kv = 2 * self.num_kv_heads * d
                k = proj[..., e: e + kv].view(b, length, 2 * self.num_kv_heads, d).transpose(1, 2)
                v = proj[..., e + kv:].view(b, length, self.num_kv_heads, 2 * d).transpose(1, 2)  # [v[2g] | v[2g+1]]
                if cache is not None:
                    k, v = cache.update(k, v)
            lam = self.lambda_full()
            if self.bf16_attention:
                q, k, v, lam = q.bfloat16(), k.bfloat16(), v.bfloat16(), lam.bfloat16()
                if mask is not None and mask.is_floating_point():
                    mask = mask.bfloat16()
            window = (self.sliding_window - 1, 0) if self.sliding_window is not None else None  # bottom-right band
            out = diff_attention(q, k, v, lam, attn_mask=mask, is_causal=True, window=window, scale=self.scaling,
                                 impl=self.impl).to(x.dtype)  # (B, H, L, 2d)
            out = self.subln(out) * (1 - self.lambda_init)
            return self.out_proj(out.transpose(1, 2).reshape(b, length, e))  # (B, H, L, 2d) -> (B, L, 40 * 64)

    def extra_repr(self) -> str:
        kind = "yoco_cross" if self.yoco_cross else (f"sliding_window={self.sliding_window}" if self.sliding_window
                                                     else "full")
        return (f"hidden_size={self.hidden_size}, heads={2 * self.num_heads}, kv_heads={2 * self.num_kv_heads}, "
                f"head_dim={self.head_dim}, layer_idx={self.layer_idx}, {kind}, bf16_attention={self.bf16_attention}, "
                f"impl={self.impl!r}")
