"""What the benchmark runs: the shape of a case, the methods it compares, and how each is called.

A method is data (:class:`Method`): a name, what it costs in FLOPs, why it cannot run a case,
an untimed ``prepare`` (layouts, modules, caches) and a timed ``run``. The list of methods is
built from the registry (:data:`multihead_sdpadiff.IMPLS`) plus two comparisons:

* ``standard``: the cost floor, plain causal attention of the same width (2H maps of width d at
  op level; at module level a same-width standard multi-head attention layer);
* ``hf_diffllama``: the peer, transformers' ``DiffLlamaAttention`` (at op level the attention core
  of its forward: two calls of transformers' SDPA function with V split across heads).

Tests and users can append their own :class:`Method` objects (for example a deliberately wrong
one) and the runner treats them like the others.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import multihead_sdpadiff as msd
from multihead_sdpadiff.masks import causal_mask
from multihead_sdpadiff.ops import _prepare as prepare_op_inputs
from multihead_sdpadiff.ops import get_strategy
from multihead_sdpadiff.ops.registry import Strategy

LEVELS = ("op", "module")
MODES = ("fwd", "fwd_bwd", "decode")
STANDARD = "standard"
PEER = "hf_diffllama"

#: Backward costs about 2.5x the forward for attention (two matmuls for dV/dP, two for dQ/dK, plus
#: the recomputation of P that flash-style kernels do); a Linear's backward is exactly 2x.
ATTN_BWD_FACTOR = 2.5
LINEAR_BWD_FACTOR = 2.0


@dataclass(frozen=True)
class Case:
    """One point of the sweep. ``seq_len`` N is the number of keys; queries are N too, except in
    ``decode`` where one query token attends the N keys."""

    level: str
    mode: str
    batch: int
    seq_len: int
    embed_dim: int
    num_heads: int  # the baseline's head count; H = num_heads // 2 differential heads
    num_kv_heads: int
    dtype: torch.dtype
    device: str

    @property
    def heads(self) -> int:
        return self.num_heads // 2

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads // 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def q_len(self) -> int:
        return 1 if self.mode == "decode" else self.seq_len

    @property
    def causal_halves(self) -> bool:
        """True when the causal mask hides about half of the scores (Lq == Lk)."""
        return self.q_len == self.seq_len and self.seq_len > 1

    def qkv_bytes(self) -> int:
        """Bytes of q (B, 2H, Lq, d) + k (B, 2Hkv, N, d) + v (B, Hkv, N, 2d) in the case dtype."""
        b, d, n = self.batch, self.head_dim, self.seq_len
        numel = b * (2 * self.heads * self.q_len * d + 2 * self.kv_heads * n * d + self.kv_heads * n * 2 * d)
        return numel * _itemsize(self.dtype)

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return (f"B={self.batch} E={self.embed_dim} heads={self.num_heads} kv_heads={self.num_kv_heads} "
                f"(H={self.heads} differential heads, d={self.head_dim})")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def standard_attention_flops(case: Case) -> float:
    """Forward FLOPs of standard attention over 2H maps of width d: 4·B·2H·Lq·Lk·d (two matmuls,
    2 FLOPs per multiply-add), halved when the causal mask hides half the scores."""
    f = 4.0 * case.batch * 2 * case.heads * case.q_len * case.seq_len * case.head_dim
    return f / 2 if case.causal_halves else f


def projection_flops(case: Case) -> float:
    """Forward FLOPs of the four bias-free projections (q, k, v, out) of a module: 2·B·Lq·E·(2E + 2·kv_dim)."""
    e = case.embed_dim
    kv_dim = case.num_kv_heads * case.head_dim
    return 2.0 * case.batch * case.q_len * e * (2 * e + 2 * kv_dim)


def case_flops(case: Case, relative: float) -> float:
    """FLOPs of one timed call of a method whose attention costs ``relative`` x standard attention."""
    attn = relative * standard_attention_flops(case)
    proj = projection_flops(case) if case.level == "module" else 0.0
    if case.mode == "fwd_bwd":
        return attn * (1 + ATTN_BWD_FACTOR) + proj * (1 + LINEAR_BWD_FACTOR)
    return attn + proj


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One thing the benchmark times.

    Attributes:
        name: the name in tables and in ``--impls``.
        kind: ``"diff"`` (compared with the differential reference), ``"standard"`` (compared with
            plain attention), ``"peer"`` (another library's differential attention) or
            ``"diff_v2"`` (compared with the V2 reference, ``bench/cases_v2.py``) or ``"diff_gda"``
            (compared with the GDA reference through ``truth``, ``bench/cases_gda.py``).
        summary: one line for the docs and the results file.
        flops: attention FLOPs relative to standard attention of the same width, or a function of
            the case (``auto`` depends on what it resolves to).
        score_memory: ``"O(N^2)"`` when the method holds full score matrices (used to skip cases
            that cannot fit), anything else otherwise.
        unavailable: ``f(case) -> reasons``; empty when the method can run the case.
        prepare: ``f(case, tensors) -> state``, untimed: layouts, modules, caches. It must stay
            differentiable in ``tensors`` (the correctness check takes gradients through it).
        run: ``f(state) -> output``, the timed call.
        canonical: the output in the reference layout (used by the correctness check only).
        resolve: for ``auto``: ``f(case) -> the strategy it runs``.
        strategy_of: for an ``auto`` of another op's registry: ``f(name) -> Strategy``, used to
            look up the resolved strategy's ``score_memory`` (default: V1's registry).
        truth: the correctness check's truth, when the method's kind has none of its own:
            ``f(q, k, v, lam, upcast) -> output`` on the op-level tensors, the float64 reference
            with ``upcast``, else the plain equation in the inputs' dtype (``bench/cases_gda.py``).
    """

    name: str
    kind: str
    summary: str
    flops: float | Callable[[Case], float]
    score_memory: str
    unavailable: Callable[[Case], list[str]]
    prepare: Callable[[Case, dict], dict]
    run: Callable[[dict], torch.Tensor]
    canonical: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out)
    resolve: Callable[[Case], str] | None = None
    strategy_of: Callable[[str], Strategy] | None = None
    truth: Callable[..., torch.Tensor] | None = None

    def relative_flops(self, case: Case) -> float | None:
        try:
            return self.flops(case) if callable(self.flops) else float(self.flops)
        except Exception:  # noqa: BLE001 - an unknown cost leaves GFLOP/s empty, it is not an error
            return None


# ---- tensors shared by every method of a case ---------------------------------------------------


def make_tensors(case: Case, seed: int, dtype: torch.dtype | None = None) -> dict:
    """The inputs of one case, drawn on the CPU from ``seed`` (so every device sees the same numbers).

    op: ``q (B, 2H, Lq, d)``, ``k (B, 2Hkv, N, d)``, ``v (B, Hkv, N, 2d)``, ``lam (H,)``.
    module: ``x (B, N, E)`` and ``weights``, the state dict of a :class:`MultiheadDiffAttn`.
    """
    dtype = dtype or case.dtype
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, d, n = case.batch, case.heads, case.kv_heads, case.head_dim, case.seq_len

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=case.device, dtype=dtype)

    if case.level == "op":
        lam = (0.2 + 0.6 * torch.rand(h, generator=gen, dtype=torch.float64)).to(case.device)
        return {"q": rnd(b, 2 * h, case.q_len, d), "k": rnd(b, 2 * hkv, n, d),
                "v": rnd(b, hkv, n, 2 * d), "lam": lam.to(torch.float32 if dtype != torch.float64 else dtype)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = msd.MultiheadDiffAttn(case.embed_dim, 0, case.num_heads, case.num_kv_heads, impl="reference",
                                    dtype=torch.float64)
    weights = {k: v.detach().to(device=case.device, dtype=dtype if v.is_floating_point() else v.dtype)
               for k, v in ref.state_dict().items()}
    return {"x": rnd(b, n, case.embed_dim), "weights": weights}


def op_inputs_for_check(case: Case):
    """An :class:`~multihead_sdpadiff.ops.OpInputs` of this case's shapes, for ``not_supported_reasons``."""
    b, h, hkv, d, n = case.batch, case.heads, case.kv_heads, case.head_dim, case.seq_len
    kw = {"device": case.device, "dtype": case.dtype}
    q = torch.empty(b, 2 * h, case.q_len, d, **kw)
    k = torch.empty(b, 2 * hkv, n, d, **kw)
    v = torch.empty(b, hkv, n, 2 * d, **kw)
    return prepare_op_inputs(q, k, v, 0.5, None, True, d**-0.5)


# ---- plain attention, used as the standard's truth and as the low-precision baseline -----------


def plain_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal) v in the inputs' dtype, no upcast, GQA by repetition.

    ``q (B, Hq, Lq, d)``, ``k, v (B, Hk, Lk, d)``; causal aligned bottom-right (Lq = 1 sees all keys).
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return s.softmax(-1) @ v


def plain_diff_attention(q, k, v, lam) -> torch.Tensor:
    """The paper's equation in the inputs' dtype with no upcast (a plain low-precision run):
    what the correctness tolerance is scaled by. Causal, bottom-right. Returns (B, H, Lq, 2d)."""
    h, hkv = q.shape[1] // 2, k.shape[1] // 2
    qh = q.unflatten(1, (h, 2))  # (B, H, 2, Lq, d)
    kh = k.unflatten(1, (hkv, 2)).repeat_interleave(h // hkv, dim=1)  # (B, H, 2, Lk, d)
    s = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, 2, Lq, Lk)
    s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = s.softmax(-1)
    a = p[:, :, 0] - lam.to(q.dtype).view(1, -1, 1, 1) * p[:, :, 1]  # (B, H, Lq, Lk)
    return a @ v.repeat_interleave(h // hkv, dim=1)


def _standard_v(v: torch.Tensor) -> torch.Tensor:
    """v (B, Hkv, N, 2d) as 2Hkv heads of width d: the same numbers, the standard layout."""
    b, hkv, n, d2 = v.shape
    return v.unflatten(-1, (2, d2 // 2)).transpose(2, 3).reshape(b, 2 * hkv, n, d2 // 2)  # (B, 2Hkv, N, d)


def _sdpa_causal(q, k, v) -> torch.Tensor:
    """Causal SDPA with bottom-right alignment: is_causal when Lq == Lk, no mask for one query."""
    lq, lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = None if lq == 1 else causal_mask(lq, lk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# ---- op level ---------------------------------------------------------------------------------


def _op_state(case: Case, t: dict) -> dict:
    return {"q": t["q"], "k": t["k"], "v": t["v"], "lam": t["lam"], "grad_names": ("q", "k", "v")}


def _strategy_method(name: str) -> Method:
    strategy = get_strategy(name)

    def unavailable(case: Case) -> list[str]:
        return list(strategy.not_supported_reasons(op_inputs_for_check(case)))

    def run_op(s: dict) -> torch.Tensor:
        return msd.diff_attention(s["q"], s["k"], s["v"], s["lam"], is_causal=True, impl=name)

    return Method(name, "diff", strategy.summary, strategy.flops, strategy.score_memory,
                  unavailable, _op_state, run_op)


def _auto_method() -> Method:
    def resolve(case: Case) -> str:
        i = op_inputs_for_check(case)
        return msd.choose_impl(i.q, i.k, i.v, 0.5, is_causal=True, scale=i.scale)[0]

    def unavailable(case: Case) -> list[str]:
        try:
            resolve(case)
        except ValueError as exc:
            return [str(exc)]
        return []

    def run_op(s: dict) -> torch.Tensor:
        return msd.diff_attention(s["q"], s["k"], s["v"], s["lam"], is_causal=True, impl="auto")

    def flops(case: Case) -> float:
        return get_strategy(resolve(case)).flops

    return Method("auto", "diff", "the dispatcher's choice for this device (see choose_impl)", flops,
                  "depends", unavailable, _op_state, run_op, resolve=resolve)


def _standard_op_method() -> Method:
    def prepare(case: Case, t: dict) -> dict:
        return {"q": t["q"], "k": t["k"], "v": _standard_v(t["v"]), "grad_names": ("q", "k", "v")}

    def run(s: dict) -> torch.Tensor:
        return _sdpa_causal(s["q"], s["k"], s["v"])  # (B, 2H, Lq, d)

    return Method(STANDARD, "standard",
                  "plain causal SDPA over 2H maps of width d (GQA: 2Hkv kv maps): the cost floor",
                  1.0, "O(N)", lambda case: [], prepare, run)


def _hf_reasons() -> list[str]:
    if importlib.util.find_spec("transformers") is None:
        return ["transformers is not installed (pip install transformers)"]
    try:
        from transformers.models.diffllama import modeling_diffllama  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip, with its text
        return [f"transformers has no usable DiffLlamaAttention: {type(exc).__name__}: {exc}"]
    return []


def _hf_config(case: Case, max_len: int):
    from transformers import DiffLlamaConfig

    return DiffLlamaConfig(
        hidden_size=case.embed_dim, num_attention_heads=case.num_heads, num_key_value_heads=case.num_kv_heads,
        intermediate_size=4 * case.embed_dim, num_hidden_layers=1, vocab_size=32,
        max_position_embeddings=max(max_len, 2), rms_norm_eps=1e-5, attn_implementation="sdpa",
    )


def _hf_attention(case: Case):
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention

    config = _hf_config(case, case.seq_len)
    return DiffLlamaAttention(config, layer_idx=0).to(device=case.device, dtype=case.dtype), config


def _hf_op_method() -> Method:
    def prepare(case: Case, t: dict) -> dict:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        module, _ = _hf_attention(case)  # supplies num_key_value_groups and is_causal, as in its forward
        q, k, v, d = t["q"], t["k"], t["v"], case.head_dim
        # transformers pairs map i with map i + H (ours: 2i with 2i + 1) and splits V across heads.
        return {
            "q": torch.cat((q[:, 0::2], q[:, 1::2]), dim=1),  # (B, 2H, Lq, d)
            "k": torch.cat((k[:, 0::2], k[:, 1::2]), dim=1),  # (B, 2Hkv, N, d)
            "v": torch.cat((v[..., :d], v[..., d:]), dim=1),  # (B, 2Hkv, N, d)
            "lam": t["lam"].to(case.dtype), "module": module, "attend": sdpa_attention_forward,
            "scale": d**-0.5, "grad_names": ("q", "k", "v"),
        }

    def run(s: dict) -> torch.Tensor:
        attend, module = s["attend"], s["module"]
        v1, v2 = (half.repeat(1, 2, 1, 1) for half in torch.chunk(s["v"], 2, dim=1))  # (B, 2Hkv, N, d)
        o1, _ = attend(module, s["q"], s["k"], v1, None, dropout=0.0, scaling=s["scale"])  # (B, Lq, 2H, d)
        o2, _ = attend(module, s["q"], s["k"], v2, None, dropout=0.0, scaling=s["scale"])
        first, second = torch.cat((o1, o2), dim=-1).chunk(2, dim=2)  # (B, Lq, H, 2d) each
        return first - s["lam"].view(1, 1, -1, 1) * second

    return Method(PEER, "peer",
                  "transformers DiffLlamaAttention's core: two SDPA calls over 2H maps, V split across heads",
                  2.0, "O(N)", lambda case: _hf_reasons(), prepare, run,
                  canonical=lambda out: out.transpose(1, 2))  # (B, H, Lq, 2d)


# ---- module level -----------------------------------------------------------------------------


class StandardMHA(nn.Module):
    """A standard attention layer of the same width as :class:`MultiheadDiffAttn`: ``num_heads``
    heads of width ``d = E / num_heads`` (``num_kv_heads`` kv heads), bias-free q/k/v/out
    projections of the same shapes, causal SDPA. ``attend`` replaces SDPA (the check uses plain
    attention in float64)."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, *, attend=None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=False, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False, **kw)
        self.attend = attend or _sdpa_causal

    def forward(self, x: torch.Tensor, cache: _ConcatCache | None = None) -> torch.Tensor:
        b, length, e = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, d)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, d)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, past + L, d)
        out = self.attend(q, k, v)  # (B, nh, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, e))


class _ConcatCache:
    """The simplest KV cache (what transformers' DynamicCache does): concatenate each step."""

    def __init__(self):
        self.k = self.v = None

    def reset(self) -> None:
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


def _hf_weights(case: Case, w: dict) -> dict:
    """Our state dict in DiffLlamaAttention's layout: maps (2i, 2i+1) -> (i, i + H); V halves -> heads."""
    h, hkv, d, e = case.heads, case.kv_heads, case.head_dim, case.embed_dim

    def maps_major(weight, groups):  # rows (group, map or half, d) -> (map or half, group, d)
        return weight.view(groups, 2, d, e).transpose(0, 1).reshape(2 * groups * d, e)

    out = {"q_proj.weight": maps_major(w["q_proj.weight"], h),
           "k_proj.weight": maps_major(w["k_proj.weight"], hkv),
           "v_proj.weight": maps_major(w["v_proj.weight"], hkv),
           "o_proj.weight": w["out_proj.weight"]}
    out.update({n: w[n] for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
    return out


def _module_state(case: Case, t: dict, module: nn.Module, step, make_cache=None) -> dict:
    """State of a module method. ``step(module, x, cache)`` is one forward; decode prefills N - 1
    tokens (untimed, in ``before_each``) and times the step that makes the context N keys."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    state = {"module": module, "x": t["x"], "step": step, "grad_names": ("x",), "params": params}
    if case.mode == "decode":
        cache, prompt = make_cache(), t["x"][:, :-1]
        state.update(x=t["x"][:, -1:], cache=cache)

        def before_each():  # closes over its values, not over state: no reference cycle to collect
            cache.reset()
            step(module, prompt, cache)

        state["before_each"] = before_each
    return state


def _run_module(s: dict) -> torch.Tensor:
    return s["step"](s["module"], s["x"], s.get("cache"))


def _diff_module_method(name: str, summary: str, flops, score_memory, resolve=None) -> Method:
    def unavailable(case: Case) -> list[str]:
        reasons = []
        if case.mode == "decode" and not hasattr(msd, "KVCache"):
            reasons.append("multihead_sdpadiff has no KVCache yet: module-level decode needs it")
        if name == "auto":
            try:
                resolve(case)
            except ValueError as exc:
                reasons.append(str(exc))
        else:
            reasons.extend(get_strategy(name).not_supported_reasons(op_inputs_for_check(case)))
        return reasons

    def prepare(case: Case, t: dict) -> dict:
        module = msd.MultiheadDiffAttn(case.embed_dim, 0, case.num_heads, case.num_kv_heads, impl=name,
                                       device=case.device, dtype=case.dtype)
        module.load_state_dict(t["weights"])

        def step(m, x, cache):
            return m(x) if cache is None else m(x, cache=cache)

        def make_cache():
            try:  # preallocated: prefills and steps write in place, no growth inside the timed step
                return msd.KVCache(case.seq_len, case.batch)
            except TypeError:
                return msd.KVCache()

        return _module_state(case, t, module, step, make_cache)

    return Method(name, "diff", summary, flops, score_memory, unavailable, prepare, _run_module, resolve=resolve)


def _standard_module_method() -> Method:
    def prepare(case: Case, t: dict) -> dict:
        module = StandardMHA(case.embed_dim, case.num_heads, case.num_kv_heads, device=case.device, dtype=case.dtype)
        module.load_state_dict({n: t["weights"][n] for n in ("q_proj.weight", "k_proj.weight",
                                                            "v_proj.weight", "out_proj.weight")})

        def step(m, x, cache):
            return m(x, cache)

        return _module_state(case, t, module, step, _ConcatCache)

    return Method(STANDARD, "standard",
                  "same-width standard MHA: q/k/v/out Linear without bias, num_heads heads of width d, causal SDPA",
                  1.0, "O(N)", lambda case: [], prepare, _run_module)


def _hf_module_method() -> Method:
    def prepare(case: Case, t: dict) -> dict:
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        module, config = _hf_attention(case)
        module.load_state_dict(_hf_weights(case, t["weights"]))
        masks = {}
        # transformers 5 renamed past_key_values to cache; accept either spelling.
        mask_cache_kw = _cache_kwarg(create_causal_mask)
        forward_cache_kw = _cache_kwarg(type(module).forward)

        def inputs(x, cache):
            # Identity rotary (cos 1, sin 0) keeps the output comparable with ours, which runs
            # without RoPE. The mask is what DiffLlamaModel builds for its layers (for SDPA without
            # padding: None, and the layer relies on is_causal), made outside the timed call.
            past = 0 if cache is None else cache.get_seq_length()
            pos = torch.arange(past, past + x.shape[1], device=x.device)[None]
            cos = torch.ones(x.shape[0], x.shape[1], case.head_dim, device=x.device, dtype=x.dtype)
            mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None,
                                      position_ids=pos, **{mask_cache_kw: cache})
            return (cos, torch.zeros_like(cos)), mask

        def step(m, x, box):
            cache = None if box is None else box.inner
            # Made on the first call of each kind (a warm-up call, never a timed one).
            key = (x.shape[1], cache is not None and cache.get_seq_length() > 0)
            if key not in masks:
                masks[key] = inputs(x, cache)
            pe, mask = masks[key]
            return m(x, position_embeddings=pe, attention_mask=mask, **{forward_cache_kw: cache})[0]

        return _module_state(case, t, module, step, lambda: _FreshCache(lambda: DynamicCache(config=config)))

    return Method(PEER, "peer",
                  "transformers DiffLlamaAttention (SDPA, two calls, V split across heads), identity RoPE",
                  2.0, "O(N)", lambda case: _hf_reasons(), prepare, _run_module)


def _cache_kwarg(fn) -> str:
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


class _FreshCache:
    """transformers' DynamicCache behind a ``reset()`` that swaps in an empty one (its own API to
    empty a cache differs between versions)."""

    def __init__(self, factory):
        self._factory = factory
        self.reset()

    def reset(self) -> None:
        self.inner = self._factory()


def build_methods(level: str) -> list[Method]:
    """``standard`` first (the ratio column needs it), then every name in IMPLS, then ``hf_diffllama``."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    methods = [_standard_op_method() if level == "op" else _standard_module_method()]
    for name in msd.IMPLS:
        if name == "auto":
            auto = _auto_method()
            methods.append(auto if level == "op" else _diff_module_method(
                "auto", auto.summary, auto.flops, auto.score_memory, resolve=auto.resolve))
        elif level == "op":
            methods.append(_strategy_method(name))
        else:
            s = get_strategy(name)
            methods.append(_diff_module_method(name, s.summary, s.flops, s.score_memory))
    methods.append(_hf_op_method() if level == "op" else _hf_module_method())
    return methods
