"""timm's vision ``DiffAttention`` (``timm.layers.DiffAttention``): a layer with its options, and
state-dict conversion both ways. timm is never imported (it needs torchvision, which does not import
beside the CPU torch build used here); conversion works from state-dict keys and constructor
arguments.

timm's layout (timm 1.0.x, read from its source): ``num_heads`` counts differential heads ``H``,
``d = dim / H / 2``. ``qkv`` (dim → 3·dim) gives q and k as ``2H`` sub-heads of width ``d`` (even =
map 1, odd = map 2) and v as ``H`` heads of width ``2d``: this library's layout, so the conversion
only splits or joins ``qkv`` and renames. Then optional q/k RMSNorm over ``d``, both maps with one
shared (bidirectional by default) mask, ``sub_norm`` (RMSNorm(2d), eps 1e-5), ``× (1 − λ_init)``,
an optional RMSNorm over ``dim`` (``scale_norm``) and ``proj``. λ is the paper's (``lambda_q1`` …,
in float32) or, with ``dual_lambda``, ``exp(lambda_a) − exp(lambda_b) + λ_init``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import RMSNorm, _check_positive_int, impl_property, lambda_init_fn, reparameterized_lambda
from .ops import IMPLS, diff_attention

__all__ = ["VisionDiffAttn", "from_timm", "state_dict_from_timm", "state_dict_to_timm", "timm_kwargs", "to_timm"]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


class VisionDiffAttn(nn.Module):
    """Differential attention with timm ``DiffAttention``'s options (non-causal by default).

    Args:
        dim: model width ``E``.
        num_heads: differential heads ``H`` (timm's meaning; :class:`MultiheadDiffAttn` takes
            ``2H``). ``E`` must be divisible by ``2H``; ``head_dim = E / (2H)``.
        depth: block index for ``lambda_init = 0.8 − 0.6·exp(−0.3·depth)``.
        qkv_bias / proj_bias: biases of ``q_proj``, ``k_proj``, ``v_proj`` / ``out_proj``.
        qk_norm: RMSNorm over ``head_dim`` of every q and k sub-head (``q_norm``, ``k_norm``).
        scale_norm: RMSNorm over ``dim`` before ``out_proj`` (``norm``).
        dual_lambda: λ from two scalars ``lambda_a``, ``lambda_b`` instead of four vectors.
        norm_eps: eps of ``q_norm``, ``k_norm`` and ``norm`` (1e-6, timm ``RmsNorm``'s default;
            assumed). ``subln`` uses 1e-5, as timm's ``sub_norm``.
        causal: default of ``is_causal`` in :meth:`forward` (timm: False).
        impl: the V1 strategy, a name from :data:`~multihead_sdpadiff.IMPLS`.

    No dropout: the converted layer equals timm's in eval mode. There is no RoPE and no cache.
    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (E → E), ``q_norm.weight`` and
    ``k_norm.weight`` ``(head_dim,)``, ``norm.weight`` ``(E,)``, ``lambda_q1`` … ``(head_dim,)`` or
    ``lambda_a``, ``lambda_b`` ``()``, ``subln.weight`` ``(2·head_dim,)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, depth: int = 0, qkv_bias: bool = False,
                 proj_bias: bool = True, qk_norm: bool = False, scale_norm: bool = False, dual_lambda: bool = False,
                 norm_eps: float = 1e-6, causal: bool = False, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("num_heads", num_heads)
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int (block index), got {type(depth).__name__}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if dim % (2 * num_heads):
            raise ValueError(f"dim {dim} must be divisible by 2 * num_heads = {2 * num_heads} (two maps per head)")
        for name, value in (("qkv_bias", qkv_bias), ("proj_bias", proj_bias), ("qk_norm", qk_norm),
                            ("scale_norm", scale_norm), ("dual_lambda", dual_lambda), ("causal", causal)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.embed_dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads // 2
        self.scaling = self.head_dim**-0.5
        self.depth = depth
        self.lambda_init = lambda_init_fn(depth)
        self.causal = causal
        self.dual_lambda = dual_lambda
        self.impl = impl
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias, **kw)
        self.out_proj = nn.Linear(dim, dim, bias=proj_bias, **kw)
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, **kw) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, **kw) if qk_norm else None
        self.norm = RMSNorm(dim, eps=norm_eps, **kw) if scale_norm else None
        lam_kw = {"device": device, "dtype": torch.float32 if dtype in (None, torch.float16, torch.bfloat16) else dtype}
        if dual_lambda:
            self.lambda_a = nn.Parameter(torch.zeros((), **lam_kw))
            self.lambda_b = nn.Parameter(torch.zeros((), **lam_kw))
        else:
            for name in _LAMBDAS:
                setattr(self, name, nn.Parameter(torch.empty(self.head_dim, **lam_kw).normal_(0.0, 0.1)))
        self.subln = RMSNorm(2 * self.head_dim, eps=1e-5, **kw)

    impl = impl_property(IMPLS)

    def lambda_full(self) -> torch.Tensor:
        """λ, 0-dim, in float32 (float64 for float64 parameters)."""
        if self.dual_lambda:
            work = torch.promote_types(self.lambda_a.dtype, torch.float32)
            return torch.exp(self.lambda_a.to(work)) - torch.exp(self.lambda_b.to(work)) + self.lambda_init
        return reparameterized_lambda(self)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        """timm's call: ``x (B, N, dim)``; ``attn_mask`` bool (True = may attend) or additive,
        broadcastable to ``(B, num_heads, N, N)`` and shared by both maps; ``is_causal`` (default
        the layer's ``causal``, False) adds the causal mask. Returns ``(B, N, dim)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, dim={self.embed_dim}), got shape {tuple(x.shape)}")
        causal = self.causal if is_causal is None else is_causal
        b, n, e = x.shape
        q = self.q_proj(x).view(b, n, 2 * self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, 2 * self.num_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_heads, 2 * self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = diff_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.lambda_full(),
                             attn_mask=attn_mask, is_causal=causal, scale=self.scaling, impl=self.impl)  # (B, H, N, 2d)
        out = (self.subln(out) * (1 - self.lambda_init)).transpose(1, 2).reshape(b, n, e)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.embed_dim}, heads={self.num_heads}, head_dim={self.head_dim}, depth={self.depth}, "
                f"qk_norm={self.q_norm is not None}, scale_norm={self.norm is not None}, "
                f"dual_lambda={self.dual_lambda}, causal={self.causal}, impl={self.impl!r}")


# ---- conversion -------------------------------------------------------------------------------


def _timm_shapes(dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, dual_lambda) -> dict[str, tuple]:
    d = dim // num_heads // 2
    shapes = {"qkv.weight": (3 * dim, dim), "proj.weight": (dim, dim), "sub_norm.weight": (2 * d,)}
    if qkv_bias:
        shapes["qkv.bias"] = (3 * dim,)
    if proj_bias:
        shapes["proj.bias"] = (dim,)
    if qk_norm:
        shapes["q_norm.weight"] = shapes["k_norm.weight"] = (d,)
    if scale_norm:
        shapes["norm.weight"] = (dim,)
    if dual_lambda:
        shapes["lambda_a"] = shapes["lambda_b"] = ()
    else:
        shapes.update({n: (d,) for n in _LAMBDAS})
    return shapes


def _check_keys(sd: dict, shapes: dict, what: str) -> None:
    if not isinstance(sd, dict):
        raise TypeError(f"{what} must be a dict of tensors, got {type(sd).__name__}")
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{what} does not match the constructor arguments: missing {missing}, unexpected {unexpected}")
    for name, shape in shapes.items():
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}[{name!r}] must have shape {shape}, got {tuple(t.shape)}")


def _check_args(dim, num_heads, norm_layer, attn_drop, proj_drop) -> None:
    _check_positive_int("dim", dim)
    _check_positive_int("num_heads", num_heads)
    if dim % (2 * num_heads):
        raise ValueError(f"dim {dim} must be divisible by 2 * num_heads = {2 * num_heads}")
    if norm_layer is not None and getattr(norm_layer, "__name__", norm_layer) != "RmsNorm":
        raise ValueError(f"only timm's default norm_layer RmsNorm (weight only) converts, got {norm_layer!r}")
    for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def state_dict_from_timm(timm_sd: dict[str, torch.Tensor], *, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                         qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True,
                         dual_lambda: bool = False, **ignored: Any) -> dict[str, torch.Tensor]:
    """A timm ``DiffAttention`` state dict (built with these constructor arguments) → a
    :class:`VisionDiffAttn` state dict. Tensors are sliced views or the same objects: bit-exact."""
    _check_positive_int("dim", dim)
    _check_positive_int("num_heads", num_heads)
    _check_keys(timm_sd, _timm_shapes(dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, dual_lambda),
                "timm state dict")
    out = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{name}.weight"] = timm_sd["qkv.weight"][i * dim: (i + 1) * dim]
        if qkv_bias:
            out[f"{name}.bias"] = timm_sd["qkv.bias"][i * dim: (i + 1) * dim]
    out["out_proj.weight"] = timm_sd["proj.weight"]
    if proj_bias:
        out["out_proj.bias"] = timm_sd["proj.bias"]
    renames = {"sub_norm.weight": "subln.weight", "q_norm.weight": "q_norm.weight", "k_norm.weight": "k_norm.weight",
               "norm.weight": "norm.weight", "lambda_a": "lambda_a", "lambda_b": "lambda_b",
               **{n: n for n in _LAMBDAS}}
    out.update({ours: timm_sd[theirs] for theirs, ours in renames.items() if theirs in timm_sd})
    return out


def state_dict_to_timm(layer: VisionDiffAttn) -> dict[str, torch.Tensor]:
    """A :class:`VisionDiffAttn`'s weights as a timm ``DiffAttention`` state dict (bit-exact)."""
    if not isinstance(layer, VisionDiffAttn):
        raise TypeError(f"layer must be a VisionDiffAttn, got {type(layer).__name__}")
    sd = layer.state_dict()
    out = {"qkv.weight": torch.cat([sd[f"{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])}
    if layer.q_proj.bias is not None:
        out["qkv.bias"] = torch.cat([sd[f"{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
    if layer.q_norm is not None:
        out["q_norm.weight"], out["k_norm.weight"] = sd["q_norm.weight"], sd["k_norm.weight"]
    if layer.norm is not None:
        out["norm.weight"] = sd["norm.weight"]
    out["proj.weight"] = sd["out_proj.weight"]
    if layer.out_proj.bias is not None:
        out["proj.bias"] = sd["out_proj.bias"]
    for n in ("lambda_a", "lambda_b") if layer.dual_lambda else _LAMBDAS:
        out[n] = sd[n]
    out["sub_norm.weight"] = sd["subln.weight"]
    return out


def timm_kwargs(layer: VisionDiffAttn) -> dict[str, Any]:
    """The timm ``DiffAttention`` constructor arguments that rebuild ``layer``'s structure."""
    return {"dim": layer.embed_dim, "num_heads": layer.num_heads, "qkv_bias": layer.q_proj.bias is not None,
            "qk_norm": layer.q_norm is not None, "scale_norm": layer.norm is not None,
            "proj_bias": layer.out_proj.bias is not None, "depth": layer.depth, "dual_lambda": layer.dual_lambda}


def from_timm(timm_sd: dict[str, torch.Tensor], *, dim: int, num_heads: int = 8, qkv_bias: bool = False,
              qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
              proj_drop: float = 0.0, norm_layer=None, depth: int = 0, dual_lambda: bool = False,
              norm_eps: float = 1e-6, impl: str = "auto", device=None, dtype=None) -> VisionDiffAttn:
    """Build a :class:`VisionDiffAttn` from a timm ``DiffAttention`` state dict and its constructor
    arguments (same names and defaults as timm's). Loads strictly. ``attn_drop``/``proj_drop`` are
    accepted and not reproduced (the layer equals timm's in eval mode); ``norm_layer`` must be timm's
    default ``RmsNorm`` (``None`` or that class)."""
    _check_args(dim, num_heads, norm_layer, attn_drop, proj_drop)
    sd = state_dict_from_timm(timm_sd, dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              scale_norm=scale_norm, proj_bias=proj_bias, dual_lambda=dual_lambda)
    layer = VisionDiffAttn(dim, num_heads, depth=depth, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                           scale_norm=scale_norm, dual_lambda=dual_lambda, norm_eps=norm_eps, impl=impl,
                           device=device, dtype=dtype)
    layer.load_state_dict(sd, strict=True)
    return layer


def to_timm(layer: VisionDiffAttn) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, constructor kwargs)`` for timm's ``DiffAttention(**kwargs).load_state_dict(state_dict)``."""
    return state_dict_to_timm(layer), timm_kwargs(layer)
