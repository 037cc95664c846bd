"""The Grouped Differential Attention layer (Lim et al., arXiv 2510.06949; Motif-2 checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .cache import KVCache, transaction
from .layers import (
    RMSNorm,
    _check_positive_int,
    check_position_ids,
    check_rel_pos,
    impl_property,
    reparameterized_lambda,
)
from .ops.grouped import IMPLS_GROUPED, grouped_diff_attention
from .rotary import apply_rotary_emb

__all__ = ["GroupedDiffAttn", "motif_lambda_init"]


def motif_lambda_init(layer_idx: int) -> float:
    """Motif's λ_init: ``0.8 − 0.6·exp(−0.3·(layer_idx − 1))`` with ``layer_idx`` 0-based.

    The ``− 1`` shifts the paper's rule by one layer, so layer 0 gets ``0.8 − 0.6·e^0.3 ≈ −0.010``.
    """
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_idx - 1))


class GroupedDiffAttn(nn.Module):
    """Grouped differential attention with Motif-2's layout and parameter names.

    The ``H = num_heads`` query heads of width ``d`` split into ``N_n = num_noise_heads`` noise heads
    and ``N_s = H − N_n`` signal heads, ``r = N_s / N_n`` signal heads per noise head. Query head
    ``h = g·(r+1) + i`` is signal head ``j = g·r + i`` when ``i < r`` and noise head ``g`` when
    ``i = r`` (group-striped). The ``Hkv = num_kv_heads`` key/value heads form ``P = Hkv / 2``
    pairs: pair ``p`` has signal key ``k[2p]``, noise key ``k[2p+1]`` and the value
    ``[v[2p] | v[2p+1]]`` of width ``2d`` (interleaved). Noise head ``g`` and its signal heads read
    pair ``g // (N_n / P)``; ``P`` must divide ``N_n`` (Motif-2-12.7B: ``H = 40``, ``N_n = 8``,
    ``Hkv = 16``, ``d = 128``, so ``r = 4`` and ``P = 8``).

    Signal head ``j`` outputs ``(1 − λ_init)·subln(A_sig_j·V − λ·A_noise_{j//r}·V)``; the
    ``N_s`` outputs of width ``2d`` are concatenated into ``o_proj``. ``r = 1`` is plain differential
    attention (Motif-2.6B), the same numbers as :class:`MultiheadDiffAttn` with the q/k rows of each
    head permuted from NeoX to GPT-J order (see ``tests/test_grouped.py``).

    Args:
        embed_dim: model width E.
        num_heads: all query heads ``H`` (signal and noise).
        num_noise_heads: ``N_n``, dividing ``H`` with ``H / N_n >= 2``.
        num_kv_heads: ``Hkv`` (even, ``Hkv / 2`` dividing ``N_n``); default ``2 * N_n``.
        head_dim: ``d`` (default ``embed_dim // num_heads``).
        layer_idx: 0-based layer index; sets ``lambda_init`` by :func:`motif_lambda_init` unless
            ``lambda_init`` is given.
        lambda_init: override λ_init (a float).
        causal: apply the causal mask (bottom-right aligned) in addition to any ``attn_mask``.
        norm_eps: eps of ``subln`` (Motif: the config's ``rms_norm_eps``), default 1e-5.
        bias: bias on q/k/v/o projections (default False; Motif's attention has none, assumed).
        impl: a name from :data:`~multihead_sdpadiff.ops.grouped.IMPLS_GROUPED`.

    Parameters: ``q_proj`` (E → H·d), ``k_proj`` and ``v_proj`` (E → Hkv·d), ``o_proj``
    (N_s·2d → E), ``lambda_q1``, ``lambda_k1``, ``lambda_q2``, ``lambda_k2`` of shape ``(d,)``,
    ``subln.weight`` of shape ``(2d,)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_noise_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        layer_idx: int,
        lambda_init: float | None = None,
        causal: bool = True,
        norm_eps: float = 1e-5,
        bias: bool = False,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("num_noise_heads", num_noise_heads)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int (0-based layer index), got {type(layer_idx).__name__}")
        if layer_idx < 0:
            raise ValueError(f"layer_idx must be >= 0, got {layer_idx}")
        if num_heads % num_noise_heads or num_heads // num_noise_heads < 2:
            raise ValueError(f"num_noise_heads {num_noise_heads} must divide num_heads {num_heads} with at least "
                             f"one signal head per noise head (num_heads / num_noise_heads >= 2)")
        if num_kv_heads is None:
            num_kv_heads = 2 * num_noise_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_kv_heads % 2 or num_noise_heads % (num_kv_heads // 2):
            raise ValueError(f"num_kv_heads {num_kv_heads} must be even, and num_kv_heads / 2 kv pairs must divide "
                             f"num_noise_heads {num_noise_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads} "
                                 f"when head_dim is not given")
            head_dim = embed_dim // num_heads
        _check_positive_int("head_dim", head_dim)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if lambda_init is not None and (isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float))):
            raise TypeError(f"lambda_init must be a float or None, got {type(lambda_init).__name__}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_noise_heads = num_noise_heads
        self.num_signal_heads = num_heads - num_noise_heads
        self.ratio = self.num_signal_heads // num_noise_heads  # r
        self.num_kv_heads = num_kv_heads
        self.num_kv_pairs = num_kv_heads // 2  # P
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.causal = causal
        self.impl = impl
        self.layer_idx = layer_idx
        self.lambda_init = float(lambda_init) if lambda_init is not None else motif_lambda_init(layer_idx)

        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(self.num_signal_heads * 2 * head_dim, embed_dim, bias=bias, **kw)
        lam_kw = {"device": device, "dtype": dtype or torch.float32}
        self.lambda_q1 = nn.Parameter(torch.empty(head_dim, **lam_kw))
        self.lambda_k1 = nn.Parameter(torch.empty(head_dim, **lam_kw))
        self.lambda_q2 = nn.Parameter(torch.empty(head_dim, **lam_kw))
        self.lambda_k2 = nn.Parameter(torch.empty(head_dim, **lam_kw))
        self.subln = RMSNorm(2 * head_dim, eps=norm_eps, **kw)
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    impl = impl_property(IMPLS_GROUPED)

    def lambda_full(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, 0-dim, in float32 (float64 for float64 parameters)."""
        return reparameterized_lambda(self)

    def split_heads(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q (B, L, H, d)`` → signal ``(B, L, N_s, d)`` and noise ``(B, L, N_n, d)`` (group-striped)."""
        b, length = q.shape[:2]
        qg = q.view(b, length, self.num_noise_heads, self.ratio + 1, self.head_dim)  # (B, L, N_n, r+1, d)
        return qg[:, :, :, : self.ratio].reshape(b, length, self.num_signal_heads, self.head_dim), qg[:, :, :, self.ratio]

    def forward(
        self,
        x: torch.Tensor,
        rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``(B, L, embed_dim)``.
            rel_pos: optional ``(cos, sin)``, each ``(seqlen_ro, head_dim / 2)``; row ``p`` holds
                absolute position ``p``. Applied NeoX style (pairs ``(x[i], x[i + d/2])``) to all
                ``H`` query heads and ``Hkv`` key heads before the split.
            attn_mask: optional bool (True = may attend) or additive float mask broadcastable to
                ``(B, N_n, L, Lk)`` (one per noise group, shared with its signal heads) with
                ``Lk = len(cache) + L``, e.g. ``(L, Lk)`` or ``(B, 1, 1, Lk)`` for key padding.
                With ``causal=True`` the causal mask applies too, aligned bottom-right.
            position_ids: optional ``(B, L)`` absolute positions for RoPE. Default:
                ``len(cache) .. len(cache) + L - 1``.
            cache: optional :class:`KVCache`; it stores keys ``(B, Hkv, S, d)`` (after RoPE) and
                values ``(B, Hkv / 2, S, 2d)``.

        Returns ``(B, L, embed_dim)``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={self.embed_dim}), got shape {tuple(x.shape)}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        b, length, _ = x.shape
        d = self.head_dim
        past = len(cache) if cache is not None else 0
        position_ids = check_position_ids(position_ids, b, length)

        q = self.q_proj(x).view(b, length, self.num_heads, d)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, d)
        v = self.v_proj(x).view(b, length, self.num_kv_pairs, 2 * d)  # [v[2p] | v[2p+1]]
        if rel_pos is not None:
            cos, sin = check_rel_pos(rel_pos, d, past + length if position_ids is None else None)
            q = apply_rotary_emb(q, cos, sin, False, past, position_ids=position_ids)
            k = apply_rotary_emb(k, cos, sin, False, past, position_ids=position_ids)
        q_sig, q_noise = self.split_heads(q)
        q_sig, q_noise = q_sig.transpose(1, 2), q_noise.transpose(1, 2)  # (B, N_s, L, d), (B, N_n, L, d)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, 2P, L, d), (B, P, L, 2d)
        with transaction(cache):  # a call that raises (a bad mask, a refused impl) leaves the cache as it was
            if cache is not None:
                k, v = cache.update(k, v)
            out = grouped_diff_attention(q_sig, q_noise, k, v, self.lambda_full(), attn_mask=attn_mask,
                                         is_causal=self.causal, scale=self.scaling, impl=self.impl)  # (B, N_s, L, 2d)
        out = self.subln(out) * (1 - self.lambda_init)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_signal_heads * 2 * d))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, heads={self.num_heads} (signal {self.num_signal_heads}, noise "
                f"{self.num_noise_heads}, r={self.ratio}), kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"lambda_init={self.lambda_init:.4f}, causal={self.causal}, impl={self.impl!r}")
