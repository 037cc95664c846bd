"""The differential-attention layer and the original project's four names as presets."""

from __future__ import annotations

import math

import torch
from torch import nn

from .cache import KVCache, transaction
from .masks import check_cu_seqlens
from .ops import IMPLS, diff_attention, diff_attention_varlen
from .rotary import apply_rotary_emb

__all__ = [
    "MultiheadDiffAttn",
    "MultiheadSdpaDiff1",
    "MultiheadSdpaDiff2",
    "MultiheadSdpaDiff3",
    "MultiheadSdpaDiff4",
    "RMSNorm",
    "lambda_init_fn",
]


def lambda_init_fn(depth: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·depth), with ``depth`` the 0-based layer index (the paper's rule)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (or wider) and cast back; learnable ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        check_eps("eps", eps)
        check_dtype(dtype)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def check_eps(name: str, eps) -> None:
    """An RMSNorm eps: a positive finite number (0 gives NaN on a row of zeros, e.g. one that sees no key)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(eps).__name__}")
    if not 0 < eps < math.inf:
        raise ValueError(f"{name} must be positive and finite (0 gives NaN on an all-zero row), got {eps}")


def check_dtype(dtype) -> None:
    """A module's ``dtype=`` argument: None or a floating torch.dtype."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, ...), got {dtype}")


def check_rel_pos(rel_pos, head_dim: int, needed: int | None, device: torch.device | None = None):
    """Validate a ``(cos, sin)`` pair of ``(seqlen_ro, head_dim / 2)`` tables covering ``needed`` positions."""
    if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
        raise TypeError("rel_pos must be a (cos, sin) pair of tensors")
    cos, sin = rel_pos
    if not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor):
        raise TypeError("rel_pos must be a (cos, sin) pair of tensors")
    want = head_dim // 2
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != want:
        raise ValueError(
            f"rel_pos cos and sin must each be (seqlen_ro, head_dim / 2 = {want}), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(f"rel_pos cos and sin must be floating tables, got dtypes {cos.dtype} and {sin.dtype}")
    if device is not None and (cos.device != device or sin.device != device):
        raise ValueError(f"rel_pos cos and sin must be on x's device {device}, got {cos.device} and {sin.device}")
    if needed is not None and cos.shape[0] < needed:
        raise ValueError(f"rel_pos covers {cos.shape[0]} positions, need at least {needed}")
    return cos, sin


def check_position_ids(position_ids, batch: int, length: int):
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a tensor or None, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
    if tuple(position_ids.shape) != (batch, length):
        raise ValueError(f"position_ids must be (B, L)={(batch, length)}, got {tuple(position_ids.shape)}")
    return position_ids


def project_qkv(module, x, rel_pos, position_ids, cache, *, k_maps: int, v_width: int, cu_seqlens=None):
    """The front half shared by the differential layers: input checks, projections, RoPE, cache.

    ``module`` has ``q_proj`` (2H maps of width ``head_dim``), ``k_proj`` (``k_maps`` maps),
    ``v_proj`` (``num_kv_heads`` heads of width ``v_width``), ``embed_dim`` and ``head_dim``. RoPE is
    applied GPT-J style to q and k at positions ``len(cache) + l`` or ``position_ids``. Returns q
    ``(B, 2H, L, d)``, and k ``(B, k_maps, Lk, d)`` and v ``(B, num_kv_heads, Lk, v_width)`` with
    ``Lk = len(cache) + L``, all in the op's (B, heads, length, width) layout.

    It appends to ``cache``: call it inside :func:`~multihead_sdpadiff.cache.transaction` so that
    a later failure of the call undoes the write.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != module.embed_dim:
        raise ValueError(f"x must be (B, L, embed_dim={module.embed_dim}), got shape {tuple(x.shape)}")
    weight = module.q_proj.weight
    # Under autocast the projections cast x themselves, so any floating x is fine there.
    if x.dtype != weight.dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x must have the layer's dtype {weight.dtype}, got {x.dtype} (cast x or the layer with .to())")
    if x.device != weight.device:
        raise ValueError(f"x must be on the layer's device {weight.device}, got {x.device}")
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
    b, length, _ = x.shape
    d = module.head_dim
    past = cache.seen_tokens if cache is not None else 0  # absolute position of the first new token
    position_ids = check_position_ids(position_ids, b, length)

    # Sizes from each projection's output (no -1, so that an empty x reshapes too): under tensor
    # parallelism (parallel.py) a rank's projections hold a slice of the maps.
    q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)
    q = q.view(b, length, q.shape[-1] // d, d)
    k = k.view(b, length, k.shape[-1] // d, d)
    v = v.view(b, length, v.shape[-1] // v_width, v_width)
    if rel_pos is not None:
        cos, sin = check_rel_pos(rel_pos, d, past + length if position_ids is None else None, x.device)
        q = apply_rotary_emb(q, cos, sin, True, past, position_ids=position_ids)
        k = apply_rotary_emb(k, cos, sin, True, past, position_ids=position_ids)

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, width)
    if cache is not None:
        if x.numel() == 0:
            # Nothing to append: check that the call fits the cache, but leave it untouched
            # (a first write would allocate its buffers). The queries attend over nothing.
            cache._check(k, v)
            if len(cache):
                k, v = cache.keys(), cache.values()  # so that a (B, ·, 0, len(cache)) mask still fits
            return q, k, v
        # The caller runs inside cache.transaction(), which undoes this write if anything later fails.
        if cu_seqlens is not None and cache.is_ragged:  # a packed prefill into a ragged cache: document b -> row b
            k, v = cache.update_packed(k, v, tuple(int(c) for c in cu_seqlens.tolist()))
        else:
            k, v = cache.update(k, v)  # the whole cached length
    return q, k, v


def check_sliding_window(value) -> tuple[int, int] | None:
    """``sliding_window = W`` (transformers' convention: a token sees itself and the ``W - 1``
    tokens before it) as the op's ``window = (W - 1, 0)``; ``None`` stays ``None``."""
    if value is None:
        return None
    _check_positive_int("sliding_window", value)
    return (value - 1, 0)


def packed_layout(x, position_ids, cu_seqlens, attn_mask, cache) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(cu_seqlens, position_ids)`` of a packed row, or ``(None, position_ids)`` for an ordinary call.

    A call is packed when ``cu_seqlens`` (flash-attn's int32 ``(docs + 1,)``) is given, or when
    ``x`` is one row ``(1, total, E)`` without ``attn_mask`` or cache whose ``position_ids``
    restart at 0 (transformers' ``DataCollatorWithFlattening``): each 0 after the first token
    starts a document. RoPE positions restart per document: from ``position_ids`` when given,
    else ``0 .. n_s - 1`` in each document.
    """
    if cu_seqlens is None:
        if (position_ids is None or not isinstance(position_ids, torch.Tensor) or x.shape[0] != 1
                or attn_mask is not None or cache is not None or tuple(position_ids.shape) != tuple(x.shape[:2])
                or torch.compiler.is_compiling()):
            return None, position_ids
        starts = (position_ids[0, 1:] == 0).nonzero().flatten() + 1
        if starts.numel() == 0:
            return None, position_ids
        bounds = [0, *starts.tolist(), x.shape[1]]
        return torch.tensor(bounds, dtype=torch.int32, device=x.device), position_ids
    if x.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs one packed row: x of shape (1, total, E), got {tuple(x.shape)}")
    if attn_mask is not None:
        raise ValueError("attn_mask cannot be combined with cu_seqlens: the packed documents already "
                         "define which keys each token sees")
    if cache is not None and not (isinstance(cache, KVCache) and (cache.is_ragged or (len(cache) == 0 and not cache.is_rolling))):
        raise ValueError("cu_seqlens cannot be combined with a non-empty cache: a packed prefill writes into a "
                         "ragged cache (KVCache(batch_size=docs, ragged=True)), one row per document, or into an "
                         "empty cache as one row")
    cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", x.shape[1], x.device)
    if position_ids is None:
        starts = torch.tensor(cu[:-1], device=x.device).repeat_interleave(
            torch.tensor([b - a for a, b in zip(cu, cu[1:], strict=False)], device=x.device))
        position_ids = (torch.arange(x.shape[1], device=x.device) - starts)[None]  # (1, total)
    return cu_seqlens, position_ids


def ragged_prelude(cache, x, attn_mask, position_ids, cu_seqlens):
    """For a decode step on a ragged cache: ``(old cache_seqlens, position_ids)``; else ``(None, position_ids)``.

    Row ``b``'s new tokens stand at positions ``cache_seqlens[b] + l`` (RoPE, unless
    ``position_ids`` are given)."""
    if cache is None or not isinstance(cache, KVCache) or not cache.is_ragged or cu_seqlens is not None:
        return None, position_ids
    if attn_mask is not None:
        raise ValueError("attn_mask cannot be combined with a ragged cache: each row's cache_seqlens "
                         "already says which keys it has")
    if x.dim() == 3 and cache.batch_size != x.shape[0]:
        raise ValueError(f"the ragged cache holds batch_size {cache.batch_size}, got a batch of {x.shape[0]}")
    old = cache.cache_seqlens.to(x.device)
    if position_ids is None:
        position_ids = old[:, None] + torch.arange(x.shape[1], device=x.device)
    return old, position_ids


def ragged_mask(old: torch.Tensor, length: int, lk: int, causal: bool, window) -> torch.Tensor:
    """Bool ``(B, 1, L, Lk)`` for a ragged cache: query ``l`` of row ``b`` stands at ``p = old[b] + l``
    and sees the keys ``t <= p`` (all ``old[b] + L`` of its own when not causal), within the window."""
    p = old[:, None, None] + torch.arange(length, device=old.device)[None, :, None]  # (B, L, 1)
    t = torch.arange(lk, device=old.device)[None, None, :]
    vis = t <= p if causal else t < (old[:, None, None] + length)
    if window is not None:
        left, right = window
        if left >= 0:
            vis = vis & (t >= p - left)
        if right >= 0:
            vis = vis & (t <= p + right)
    return vis[:, None]  # (B, 1, L, Lk)


def attend(op, op_varlen, q, k, v, lam, *, attn_mask, causal, window, scale, impl, cu_seqlens):
    """The layers' attention call: ``op`` on ``(B, heads, L, width)`` tensors, or ``op_varlen`` on
    the one packed row ``B = 1`` with ``cu_seqlens`` (``lam`` per token ``(1, H, L)`` for V2).
    Returns ``(B, H, L, width)``."""
    if cu_seqlens is None:
        # ``window`` is passed only when set (an ``_attend`` without that keyword runs unwindowed
        # layers). context_parallel's ``_attend`` (parallel.py) takes ``window``, and it runs packed
        # documents too: its pre-hook takes ``cu_seqlens`` out of the layer's call and hands the
        # documents to it, so under context parallelism this branch runs, packed or not.
        extra = {"window": window} if window is not None else {}
        return op(q, k, v, lam, attn_mask=attn_mask, is_causal=causal, scale=scale, impl=impl, **extra)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if isinstance(lam, torch.Tensor) and lam.dim() == 3:
        lam = lam[0].transpose(0, 1)  # (total, H)
    out = op_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lam, cu_seqlens, cu_seqlens,
                    longest, longest, is_causal=causal, window=window, scale=scale, impl=impl)  # (total, H, w)
    return out.transpose(0, 1).unsqueeze(0)


def check_mask_heads(attn_mask, heads: int) -> None:
    """V1's mask head axis counts differential heads H = num_heads // 2: say so when it does not fit."""
    if not isinstance(attn_mask, torch.Tensor) or not 3 <= attn_mask.dim() <= 4:
        return  # prepare_mask gives the general errors
    n = attn_mask.shape[-3]
    if n not in (1, heads):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} has {n} heads on its head axis; this layer has "
            f"H = num_heads // 2 = {heads} differential heads (the constructor's num_heads={2 * heads} counts "
            f"the baseline's heads), so the head axis must be 1 or {heads}"
        )


def reparameterized_lambda(module: nn.Module) -> torch.Tensor:
    """V1's λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init from ``module``'s ``lambda_q1`` … ``lambda_k2``
    and ``lambda_init``: a 0-dim tensor in float32 (float64 for float64 parameters), whatever the
    module dtype."""
    work = torch.promote_types(module.lambda_q1.dtype, torch.float32)
    l1 = torch.exp(torch.dot(module.lambda_q1.to(work), module.lambda_k1.to(work)))
    l2 = torch.exp(torch.dot(module.lambda_q2.to(work), module.lambda_k2.to(work)))
    return l1 - l2 + module.lambda_init


def impl_property(names: tuple[str, ...]) -> property:
    """An ``impl`` attribute that accepts only a name from ``names``, checked whenever it is set."""

    def get(self) -> str:
        return self._impl

    def set_(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"impl must be a str, one of {names}, got {type(value).__name__}")
        if value not in names:
            raise ValueError(f"impl must be one of {names}, got {value!r}")
        self._impl = value

    return property(get, set_, doc=f"The strategy, one of {names}; checked when set.")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


class MultiheadDiffAttn(nn.Module):
    """Multi-head differential attention (Ye et al., arXiv 2410.05258) on PyTorch SDPA.

    Args:
        embed_dim: model width E.
        depth: 0-based layer index; sets ``lambda_init = 0.8 - 0.6 * exp(-0.3 * depth)``.
        num_heads: the *baseline* Transformer's head count (even). The layer has
            ``H = num_heads // 2`` differential heads, each with two maps of width
            ``head_dim = embed_dim // num_heads`` and a value of width ``2 * head_dim``.
        num_kv_heads: the baseline's kv head count for GQA (even, dividing ``num_heads``); default
            ``num_heads``. The layer has ``Hkv = num_kv_heads // 2`` kv groups.
        impl: the strategy, a name from :data:`~multihead_sdpadiff.IMPLS`; may be changed later
            through the ``impl`` attribute.
        causal: apply the causal mask (bottom-right aligned) in addition to any ``attn_mask``.
        norm_eps: eps of the per-head RMSNorm (``subln``), default 1e-5.
        sliding_window: ``W`` or ``None``: each query sees itself and the ``W - 1`` keys before it
            (transformers' convention; the op's ``window = (W - 1, 0)``, bottom-right aligned).

    Attributes: ``num_heads`` is ``H = num_heads // 2`` (the differential heads, *not* the
    constructor's count), ``num_kv_heads`` is ``Hkv = num_kv_heads // 2``, ``head_dim`` is ``d``.
    unilm's ``MultiheadDiffAttn`` takes these halved counts as its arguments: pass twice its
    ``num_heads`` (and kv heads) here to load its checkpoints.

    Parameters (the names and shapes of unilm's and the original project's checkpoints):
    ``q_proj`` (E → E), ``k_proj`` and ``v_proj`` (E → E·Hkv/H), ``out_proj`` (E → E), all without
    bias; ``lambda_q1``, ``lambda_k1``, ``lambda_q2``, ``lambda_k2`` of shape ``(head_dim,)``;
    ``subln.weight`` of shape ``(2 * head_dim,)``.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        impl: str = "auto",
        causal: bool = True,
        norm_eps: float = 1e-5,
        sliding_window: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.window = check_sliding_window(sliding_window)
        self.sliding_window = sliding_window
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int (0-based layer index), got {type(depth).__name__}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (0-based layer index), got {depth}")
        if num_heads % 2:
            raise ValueError(f"num_heads must be even (it is halved into differential heads), got {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_kv_heads % 2:
            raise ValueError(f"num_kv_heads must be even (it is halved like num_heads), got {num_kv_heads}")
        if num_kv_heads > num_heads or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads} and not exceed it")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        check_eps("norm_eps", norm_eps)
        check_dtype(dtype)

        self.embed_dim = embed_dim
        self.num_heads = num_heads // 2  # differential heads H
        self.num_kv_heads = num_kv_heads // 2  # kv groups Hkv
        self.n_rep = self.num_heads // self.num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.causal = causal
        self.impl = impl
        self.lambda_init = lambda_init_fn(depth)

        kw = {"device": device, "dtype": dtype}
        kv_dim = embed_dim // self.n_rep
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)
        lam_kw = {"device": device, "dtype": dtype or torch.float32}
        self.lambda_q1 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_k1 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_q2 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.lambda_k2 = nn.Parameter(torch.empty(self.head_dim, **lam_kw))
        self.subln = RMSNorm(2 * self.head_dim, eps=norm_eps, **kw)
        self.reset_lambda_parameters()

    impl = impl_property(IMPLS)

    # The attention core, called with diff_attention's arguments; context_parallel (parallel.py)
    # replaces it on an instance with one that gathers keys and values over the sequence shards.
    _attend = staticmethod(diff_attention)

    def reset_lambda_parameters(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def lambda_full(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, a 0-dim tensor in float32 (float64 if the
        parameters are float64), whatever the module dtype."""
        return reparameterized_lambda(self)

    def forward(
        self,
        x: torch.Tensor,
        rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``(B, L, embed_dim)``, or one packed row ``(1, total, embed_dim)`` of documents.
            rel_pos: optional ``(cos, sin)``, each ``(seqlen_ro, head_dim / 2)``; ``None`` (the
                default) applies no RoPE at all. Row ``p`` holds
                absolute position ``p``. Applied GPT-J style (interleaved) to q and k.
            attn_mask: optional bool (True = may attend) or additive float mask broadcastable to
                ``(B, H, L, Lk)`` with ``H = num_heads // 2`` and ``Lk = len(cache) + L`` (``L``
                without a cache), e.g. ``(L, Lk)``, ``(B, 1, L, Lk)`` as transformers builds it, or
                ``(B, 1, 1, Lk)`` for key padding. With ``causal=True`` the causal mask applies
                too, aligned bottom-right: the ``L`` new tokens are the last ``L`` positions.
            position_ids: optional ``(B, L)`` absolute positions for RoPE (left-padded batches).
                Default: ``len(cache) .. len(cache) + L - 1`` for every sequence.
            cache: optional :class:`KVCache`; the new keys and values (after RoPE) are appended
                and the queries attend over everything cached.
            cu_seqlens: optional int32 ``(docs + 1,)`` boundaries of the documents packed in ``x``
                of shape ``(1, total, E)`` (flash-attn's varlen layout): a token sees only its own
                document (causal and window per document) and RoPE restarts at 0 in each. Packed
                ``position_ids`` that restart at 0 (one row, no mask, no cache) mean the same.

        Returns ``(B, L, embed_dim)``.
        """
        check_mask_heads(attn_mask, self.num_heads)
        cu_seqlens, position_ids = packed_layout(x, position_ids, cu_seqlens, attn_mask, cache)
        old, position_ids = ragged_prelude(cache, x, attn_mask, position_ids, cu_seqlens)
        causal, window = self.causal, self.window
        with transaction(cache):  # a call that raises leaves the cache as it was
            q, k, v = project_qkv(self, x, rel_pos, position_ids, cache, k_maps=2 * self.num_kv_heads,
                                  v_width=2 * self.head_dim, cu_seqlens=cu_seqlens)  # (B, 2H, L, d), (B, 2Hkv, Lk, d), (B, Hkv, Lk, 2d)
            b, length = x.shape[:2]
            if old is not None:
                attn_mask, causal, window = ragged_mask(old, length, k.shape[2], causal, window), False, None
            out = attend(self._attend, diff_attention_varlen, q, k, v, self.lambda_full(), attn_mask=attn_mask,
                         causal=causal, window=window, scale=self.scaling, impl=self.impl,
                         cu_seqlens=cu_seqlens)  # (B, H, L, 2d)
            out = self.subln(out) * (1 - self.lambda_init)
            return self.out_proj(out.transpose(1, 2).reshape(b, length, out.shape[1] * out.shape[3]))  # local H under TP

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, lambda_init={self.lambda_init:.4f}, causal={self.causal}, impl={self.impl!r}"
            + (f", sliding_window={self.sliding_window}" if self.sliding_window is not None else "")
        )


class _Preset(MultiheadDiffAttn):
    """A :class:`MultiheadDiffAttn` pinned to one strategy, with the original project's signature."""

    _preset_impl: str

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_kv_heads: int | None = None, **kwargs):
        super().__init__(embed_dim, depth, num_heads, num_kv_heads, impl=self._preset_impl, **kwargs)


class MultiheadSdpaDiff1(_Preset):
    """The original's variant 1: four SDPA calls of width d (``impl="sdpa_4pass"``)."""

    _preset_impl = "sdpa_4pass"


class MultiheadSdpaDiff2(_Preset):
    """The original's variant 2: two SDPA calls with v of width 2d (``impl="sdpa_2pass"``)."""

    _preset_impl = "sdpa_2pass"


class MultiheadSdpaDiff3(_Preset):
    """The original's variant 3: one SDPA call over 4H heads of width d (``impl="sdpa_stacked"``)."""

    _preset_impl = "sdpa_stacked"


class MultiheadSdpaDiff4(_Preset):
    """The original's variant 4: one SDPA call over 2H maps, v repeated (``impl="sdpa_paired"``)."""

    _preset_impl = "sdpa_paired"
