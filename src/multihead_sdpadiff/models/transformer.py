"""A small decoder-only language model built from the package's attention layers.

Each block is pre-norm: ``x + attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``. A final RMSNorm
and an LM head tied to the token embedding give the logits. RoPE tables come from
:class:`~multihead_sdpadiff.RotaryEmbedding` and are shared by every layer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, transaction
from ..layers import MultiheadDiffAttn, RMSNorm, check_dtype
from ..layers_v2 import MultiheadDiffAttnV2
from ..ops import IMPLS
from ..ops.v2 import IMPLS_V2
from ..rotary import RotaryEmbedding
from .attention import ATTENTIONS, LayerAttention, StandardAttention, attention_maps

__all__ = ["CausalLMOutput", "DiffTransformer", "DiffTransformerConfig", "SwiGLU"]

_CHECKPOINT_FORMAT = "multihead_sdpadiff.DiffTransformer/1"

#: Names accepted in ``DiffTransformerConfig.layer_types``.
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")


def _bad(field: str, why: str, value) -> ValueError:
    return ValueError(f"DiffTransformerConfig.{field} {why}, got {value!r}")


def check_values(t: torch.Tensor) -> bool:
    """Whether to run checks that read tensor values (token id and label ranges).

    Reading a value forces a device synchronisation, so these checks run on CPU tensors always, on
    other devices only when the environment sets ``SDPADIFF_DEBUG=1``, and never inside a
    ``torch.compile`` region (a graph cannot branch on values).
    """
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("SDPADIFF_DEBUG") == "1"


def check_labels(labels, b: int, length: int, vocab: int) -> None:
    """``labels`` must be an integer ``(B, L)`` tensor of token ids in ``[0, vocab)`` or -100 (ignored)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
    if tuple(labels.shape) != (b, length):
        raise ValueError(f"labels must be (B, L)={(b, length)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer token ids (or -100), got dtype {labels.dtype}")
    if labels.numel() and check_values(labels):
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, vocab_size={vocab}) or be -100 (ignored), got {int(labels[bad][0])}")


@dataclass
class DiffTransformerConfig:
    """The knobs of :class:`DiffTransformer`; checked when created (a ValueError names the field).

    Attributes:
        vocab_size: number of token ids.
        embed_dim: model width E.
        num_layers: number of blocks.
        num_heads: the *baseline* Transformer's head count, ``head_dim = embed_dim // num_heads``
            (even, for RoPE). ``"standard"`` has ``num_heads`` heads; ``"diff"`` has
            ``num_heads // 2`` differential heads of value width ``2 * head_dim`` (the paper's
            matching: the same projection shapes), so ``num_heads`` must be even;
            ``"diff_v2"`` passes it on to ``MultiheadDiffAttnV2``.
        num_kv_heads: the baseline's key/value heads (GQA), dividing ``num_heads``; default
            ``num_heads``. Even for ``"diff"``.
        attention: ``"diff"``, ``"diff_v2"`` or ``"standard"``.
        impl: the differential strategy (``"diff"``: a name from :data:`~multihead_sdpadiff.IMPLS`;
            ``"diff_v2"``: passed on); ignored by ``"standard"``.
        intermediate_size: SwiGLU hidden width; default ``8/3 · embed_dim`` rounded up to a multiple
            of 16.
        match_params: shrink each block's SwiGLU so that the block has as many parameters as a
            ``"standard"`` block of the same config (to within ``3 · embed_dim``, one hidden unit).
            ``"diff"``'s extra ``6 · head_dim`` per layer (λ and the sub-norm) rounds to no change
            unless ``num_heads == 2``; ``"diff_v2"``'s extra query maps and λ projection are paid
            for by a narrower SwiGLU.
        max_seq_len: positions covered by the RoPE tables; longer inputs raise.
        rope_base: RoPE base θ.
        norm_eps: eps of every RMSNorm (blocks, final norm and the differential sub-norm).
        init_std: standard deviation of the normal init of embeddings and linear weights; the
            projections that write into the residual stream use ``init_std / sqrt(2 · num_layers)``.
        sliding_window: ``W`` or ``None``. Windowed layers let each token see itself and the
            ``W - 1`` tokens before it (transformers' convention); :meth:`DiffTransformer.generate`
            gives them a rolling cache of the last ``W - 1`` positions.
        layer_types: which layers are windowed, one of ``"sliding_attention"`` or
            ``"full_attention"`` per layer (transformers' name), e.g. alternating. Default: every
            layer ``"sliding_attention"`` when ``sliding_window`` is set, else every layer full.
    """

    vocab_size: int = 256
    embed_dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int | None = None
    attention: str = "diff"
    impl: str = "auto"
    intermediate_size: int | None = None
    match_params: bool = True
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _bad(name, "must be a positive int", value)
        for name in ("num_kv_heads", "intermediate_size", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise _bad(name, "must be a positive int or None", value)
        for name in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise _bad(name, "must be a positive finite number", value)
        if self.layer_types is not None:
            if not isinstance(self.layer_types, (tuple, list)) or len(self.layer_types) != self.num_layers or any(
                t not in LAYER_TYPES for t in self.layer_types
            ):
                raise _bad("layer_types", f"must be None or {self.num_layers} entries (num_layers) from {LAYER_TYPES}",
                           self.layer_types)
            self.layer_types = tuple(self.layer_types)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise _bad("layer_types", "has sliding_attention layers but sliding_window is None", self.layer_types)
        if not isinstance(self.match_params, bool):
            raise _bad("match_params", "must be a bool", self.match_params)
        if self.attention not in ATTENTIONS:
            raise _bad("attention", f"must be one of {ATTENTIONS}", self.attention)
        if not isinstance(self.impl, str):
            raise _bad("impl", "must be a str", self.impl)
        if self.attention == "diff" and self.impl not in IMPLS:
            raise _bad("impl", f"must be one of {IMPLS} for attention='diff'", self.impl)
        if self.attention == "diff_v2" and self.impl not in IMPLS_V2:
            raise _bad("impl", f"must be one of {IMPLS_V2} for attention='diff_v2'", self.impl)
        if self.embed_dim % self.num_heads:
            raise _bad("num_heads", f"must divide embed_dim {self.embed_dim}", self.num_heads)
        if (self.embed_dim // self.num_heads) % 2:
            raise _bad("num_heads", f"must leave an even head_dim = embed_dim // num_heads for RoPE "
                       f"(embed_dim {self.embed_dim})", self.num_heads)
        kv = self.kv_heads
        if kv > self.num_heads or self.num_heads % kv:
            raise _bad("num_kv_heads", f"must divide num_heads {self.num_heads}", kv)
        if self.attention == "diff":
            if self.num_heads % 2:
                raise _bad("num_heads", "must be even for attention='diff' (halved into differential heads)",
                           self.num_heads)
            if kv % 2:
                raise _bad("num_kv_heads", "must be even for attention='diff' (halved like num_heads)", kv)

    def layer_window(self, depth: int) -> int | None:
        """The ``sliding_window`` of layer ``depth`` (``None`` for a full-attention layer)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[depth] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_size(self) -> int:
        """The SwiGLU hidden width before any ``match_params`` adjustment."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 16 * math.ceil(8 * self.embed_dim / 3 / 16)


class CausalLMOutput(NamedTuple):
    """What :meth:`DiffTransformer.forward` returns.

    ``logits`` ``(B, L, vocab_size)``; ``loss`` a 0-dim float32 tensor (float64 for a float64
    model) when ``labels`` were given, else ``None``; ``attentions`` a tuple with one :class:`~multihead_sdpadiff.models.LayerAttention`
    per layer when ``return_attention=True``, else ``None``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    attentions: tuple[LayerAttention, ...] | None = None


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, dim: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden, bias=False, **kw)
        self.up_proj = nn.Linear(dim, hidden, bias=False, **kw)
        self.down_proj = nn.Linear(hidden, dim, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _make_attention(config: DiffTransformerConfig, depth: int, **kw) -> nn.Module:
    kw["sliding_window"] = config.layer_window(depth)
    if config.attention == "diff":
        return MultiheadDiffAttn(config.embed_dim, depth, config.num_heads, config.kv_heads, impl=config.impl,
                                 norm_eps=config.norm_eps, **kw)
    if config.attention == "standard":
        return StandardAttention(config.embed_dim, config.num_heads, config.kv_heads, **kw)
    return MultiheadDiffAttnV2(config.embed_dim, config.num_heads, config.kv_heads, impl=config.impl, **kw)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Block(nn.Module):
    """Pre-norm block: ``x + attn(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: DiffTransformerConfig, depth: int, **kw):
        super().__init__()
        e = config.embed_dim
        self.attn_norm = RMSNorm(e, eps=config.norm_eps, **kw)
        self.attn = _make_attention(config, depth, **kw)
        hidden = config.ffn_size
        if config.match_params and config.attention != "standard":
            # Pay for the attention's extra parameters with SwiGLU hidden units (3·E each).
            extra = _count(self.attn) - _count(StandardAttention(e, config.num_heads, config.kv_heads,
                                                                 device="meta"))
            hidden -= round(extra / (3 * e))
            if hidden <= 0:
                raise _bad("intermediate_size", f"leaves no SwiGLU width once match_params pays for the "
                           f"{extra} extra attention parameters", config.intermediate_size)
        self.ffn_norm = RMSNorm(e, eps=config.norm_eps, **kw)
        self.ffn = SwiGLU(e, hidden, **kw)

    def forward(self, x, rel_pos, attn_mask, position_ids, cache, return_attention: bool = False, cu_seqlens=None):
        h = self.attn_norm(x)
        packed = {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {}  # only packed calls name it
        x = x + self.attn(h, rel_pos, attn_mask, position_ids=position_ids, cache=cache, **packed)
        maps = None
        if return_attention:
            maps = attention_maps(self.attn, h, rel_pos, attn_mask, position_ids=position_ids, cache=cache, **packed)
        return x + self.ffn(self.ffn_norm(x)), maps


class DiffTransformer(nn.Module):
    """A decoder-only language model with differential (or standard) attention.

    ``DiffTransformer(config)`` or ``DiffTransformer(**config_fields)``; see
    :class:`DiffTransformerConfig`. Parameters: ``embed_tokens`` (also the LM head),
    ``layers.{i}.{attn_norm, attn, ffn_norm, ffn}``, ``norm``.
    """

    def __init__(self, config: DiffTransformerConfig | None = None, *, device=None, dtype=None, **fields):
        super().__init__()
        if config is None:
            config = DiffTransformerConfig(**fields)
        elif fields:
            raise TypeError("give a DiffTransformerConfig or its fields as keywords, not both")
        if not isinstance(config, DiffTransformerConfig):
            raise TypeError(f"config must be a DiffTransformerConfig, got {type(config).__name__}")
        check_dtype(dtype)
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, **kw)
        self.layers = nn.ModuleList(Block(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, eps=config.norm_eps, **kw)
        head_dim = getattr(self.layers[0].attn, "head_dim", config.head_dim)
        self.rotary = RotaryEmbedding(head_dim, base=config.rope_base)
        # The (cos, sin) tables are buffers, so they move with the model and a compiled forward
        # reads them without guarding on RotaryEmbedding's lazily filled table cache.
        cos, sin = self._rope_tables(device, dtype)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _rope_tables(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles are computed in float32 (float64 for a float64 model). A later .to(bfloat16)
        # rounds the cos/sin values, an error no larger than the rotated q/k's own bf16 rounding.
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return self.rotary(self.config.max_seq_len, device=device, dtype=table_dtype)

    # ----------------------------------------------------------------------------------- setup

    def reset_parameters(self) -> None:
        """Normal(0, init_std) embeddings and linear weights; residual-writing projections scaled
        by ``1 / sqrt(2 · num_layers)``. Norms and λ keep their modules' own init."""
        std = self.config.init_std
        nn.init.normal_(self.embed_tokens.weight, std=std)
        for block in self.layers:
            for name, mod in block.named_modules():
                if isinstance(mod, nn.Linear):
                    residual = name.endswith(("out_proj", "o_proj", "down_proj"))
                    nn.init.normal_(mod.weight, std=std / math.sqrt(2 * self.config.num_layers) if residual else std)
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)

    def num_parameters(self, breakdown: bool = False) -> int | dict[str, int]:
        """Parameter count (the tied embedding/LM head once). With ``breakdown=True``, a dict with
        ``embedding``, ``attention``, ``ffn``, ``norm`` and ``total``."""
        total = _count(self)
        if not breakdown:
            return total
        attn = sum(_count(b.attn) for b in self.layers)
        ffn = sum(_count(b.ffn) for b in self.layers)
        emb = _count(self.embed_tokens)
        return {"embedding": emb, "attention": attn, "ffn": ffn, "norm": total - emb - attn - ffn, "total": total}

    def new_cache(self, batch_size: int | None = None, max_len: int | None = None) -> list[KVCache]:
        """One :class:`~multihead_sdpadiff.KVCache` per layer: growing by default, preallocated for
        ``max_len`` positions of ``batch_size`` sequences when both are given (static shapes, what a
        compiled decode step wants). Buffers are allocated at the first write. A sliding-window
        layer gets a rolling cache of its last ``W - 1`` positions instead (memory O(W); its
        shape changes until it is full)."""
        caches = []
        for i in range(len(self.layers)):
            w = self.config.layer_window(i)
            caches.append(KVCache(keep=w - 1) if w is not None else KVCache(max_len, batch_size))
        return caches

    # --------------------------------------------------------------------------------- forward

    def new_ragged_cache(self, batch_size: int) -> list[KVCache]:
        """One ragged :class:`~multihead_sdpadiff.KVCache` per layer for ``batch_size`` sequences of
        different lengths: prefill them packed (``input_ids (1, total)`` with ``cu_seqlens``, document
        ``b`` goes to row ``b``), then decode ``(batch_size, 1)`` steps with no padding; row ``b`` equals
        its sequence decoded alone. Sliding-window layers keep full rows and mask the window."""
        return [KVCache(batch_size=batch_size, ragged=True) for _ in self.layers]

    def _check_cache(self, cache) -> int:
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers) or not all(
            isinstance(c, KVCache) for c in cache
        ):
            raise TypeError(f"cache must be a list of {len(self.layers)} KVCache (see new_cache()), "
                            f"got {type(cache).__name__}")
        past = cache[0].seen_tokens
        if any(c.seen_tokens != past for c in cache):
            raise ValueError(f"the layers' caches hold different lengths {[c.seen_tokens for c in cache]}")
        return past

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_attention: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits for ``input_ids``, and a loss when ``labels`` are given.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: optional ``(B, past + L)`` padding mask, 1 (or True) for real tokens,
                0 for padding, covering the cached positions too (``past = len(cache[0])``), as in
                transformers. Padded keys are hidden from every query; the causal mask applies in
                addition. Left padding is the layout for generation.
            position_ids: optional ``(B, L)`` RoPE positions. Default: from ``attention_mask``
                when given (the count of real tokens before each one, so a left-padded sequence
                starts at 0), else ``past .. past + L - 1``. With one row (``B = 1``), no
                ``attention_mask`` and no cache, positions that restart at 0 mark packed
                documents (transformers' ``DataCollatorWithFlattening``): each token then sees only
                its own document, as with ``cu_seqlens``.
            cache: optional list of one :class:`~multihead_sdpadiff.KVCache` per layer
                (:meth:`new_cache`); the new keys and values are appended.
            labels: optional ``(B, L)`` targets aligned with ``input_ids``: position ``t``'s logits
                predict ``labels[:, t + 1]`` (the shift happens here, so ``labels=input_ids``
                trains a language model). ``-100`` is ignored. Mean cross-entropy in float32 (float64 for a
                float64 model).
            return_attention: also return every layer's attention maps (see
                :func:`~multihead_sdpadiff.models.attention_maps`), recomputed with the plain
                equations. Costs O(L · (past + L)) memory per head: for analysis only.
            cu_seqlens: optional int32 ``(docs + 1,)`` boundaries of documents packed in
                ``input_ids`` of shape ``(1, total)`` (flash-attn's varlen layout): attention stays
                inside each document (causal, and windowed in sliding layers) and RoPE restarts
                at 0 in each. ``labels`` are not cut at the boundaries: set the first label of
                each document to -100 so that no document predicts the next one's first token.

        Returns:
            :class:`CausalLMOutput` ``(logits, loss, attentions)``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        vocab = self.config.vocab_size
        if input_ids.dtype.is_floating_point or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() and check_values(input_ids):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids must lie in [0, vocab_size={vocab}), got values in [{lo}, {hi}]")
        b, length = input_ids.shape
        if labels is not None:
            check_labels(labels, b, length, vocab)
        past = self._check_cache(cache) if cache is not None else 0
        if cache is not None and cache[0].is_ragged and attention_mask is not None:
            raise ValueError("attention_mask cannot be combined with ragged caches: each row's cache_seqlens "
                             "says which keys it has (prefill ragged prompts packed, with cu_seqlens)")
        total = past + length
        if total > self.config.max_seq_len:
            raise ValueError(f"{total} positions exceed max_seq_len {self.config.max_seq_len}")

        key_mask = None  # (B, 1, 1, past + L), True = real token
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, total):
                raise ValueError(f"attention_mask must be (B, past + L)={(b, total)}, "
                                 f"got {tuple(getattr(attention_mask, 'shape', ()))}")
            real = attention_mask.to(torch.bool)
            key_mask = real[:, None, None, :]
            if position_ids is None:
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, L)

        # A call that raises (in any layer, the loss included) leaves every layer's cache as it was.
        with transaction(*(cache if cache is not None else ())):
            x = self.embed_tokens(input_ids)  # (B, L, E)
            cos, sin = self.rope_cos, self.rope_sin
            maps = []
            for i, block in enumerate(self.layers):
                c = cache[i] if cache is not None else None
                km = key_mask
                if km is not None and c is not None and c.is_rolling:
                    km = km[..., km.shape[-1] - (len(c) + length):]  # only the positions the rolling cache kept
                x, layer_maps = block(x, (cos, sin), km, position_ids, c, return_attention, cu_seqlens)
                maps.append(layer_maps)
            logits = F.linear(self.norm(x), self.embed_tokens.weight)  # (B, L, V), tied head

            loss = None
            if labels is not None:
                work = torch.promote_types(logits.dtype, torch.float32)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(work), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            return CausalLMOutput(logits, loss, tuple(maps) if return_attention else None)

    # ------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids (B, P)``; return ``(B, P + n)`` ids, ``n <= max_new_tokens``.

        Args:
            temperature: ``0`` is greedy decoding (argmax, deterministic); ``> 0`` samples from
                ``softmax(logits / temperature)``.
            top_k: sample among the ``top_k`` most likely tokens only.
            eos_token_id: a sequence that emits it is finished; its later positions are filled with
                ``eos_token_id``, and generation stops early once every sequence is finished.
            attention_mask: ``(B, P)`` 0/1, for left-padded prompts (padding first). Right padding
                raises.
            generator: optional ``torch.Generator`` for sampling.

        Decoding runs a prefill pass and then one token per step, on a preallocated
        :class:`~multihead_sdpadiff.KVCache` per layer of ``P + max_new_tokens`` positions
        (a rolling cache of ``W - 1`` positions in sliding-window layers, see :meth:`new_cache`). To
        compile it, compile the module in place (``model.compile(fullgraph=True)``): ``generate``
        calls ``self(...)``, so the prefill and the decode steps then run compiled (the decode
        graph is shape-dynamic in the key length after one recompile). ``torch.compile(model)``
        returns a wrapper whose ``generate`` runs the uncompiled forward. The module's
        train/eval mode is left as it is (the model has no dropout).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a (B, P) tensor with P >= 1")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        b, prompt = input_ids.shape
        total = prompt + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt {prompt} + max_new_tokens {max_new_tokens} exceed max_seq_len "
                             f"{self.config.max_seq_len}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, prompt):
                raise ValueError(f"attention_mask must be (B, P)={(b, prompt)}, got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(torch.long)
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or not bool(attention_mask[:, -1].all()):
                raise ValueError("generate needs left padding: each attention_mask row must be 0 … 0 1 … 1 "
                                 "and end with a real token")
        if max_new_tokens == 0:
            return input_ids

        cache = self.new_cache(b, total)
        out = self(input_ids, attention_mask=attention_mask, cache=cache)
        logits = out.logits[:, -1]  # (B, V)
        tokens = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_k, generator)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done, eos_token_id)
                done = done | (nxt == eos_token_id)
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
            logits = self(nxt[:, None], attention_mask=attention_mask, cache=cache).logits[:, -1]
        return torch.cat(tokens, dim=1)

    @staticmethod
    def _pick(logits, temperature, top_k, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write the config and ``state_dict`` to one file that
        :meth:`from_checkpoint` reads with ``torch.load(..., weights_only=True)``."""
        torch.save({"format": _CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.config),
                    "state_dict": self.state_dict()}, path)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, map_location=None) -> DiffTransformer:
        """Rebuild a model written by :meth:`save_checkpoint` (loaded with ``weights_only=True``).

        A file that cannot be opened raises the ``OSError`` of ``open`` (``FileNotFoundError``, …).
        A file that is truncated, empty, not a checkpoint of this format, or whose config, tensor
        names, shapes or dtypes do not fit together raises a ValueError naming the file.
        """
        name = os.fspath(path)
        with open(path, "rb") as f:
            try:
                blob = torch.load(f, map_location=map_location, weights_only=True)
            except Exception as exc:  # EOFError, OSError, RuntimeError, UnpicklingError: unreadable
                raise ValueError(f"{name!r} is not a readable checkpoint (truncated, empty or not written by "
                                 f"torch.save): {type(exc).__name__}: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{name!r} is not a DiffTransformer checkpoint ({_CHECKPOINT_FORMAT})")
        config, state = blob.get("config"), blob.get("state_dict")
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise ValueError(f"{name!r} lacks its 'config' or 'state_dict' dict")
        try:
            config = DiffTransformerConfig(**config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name!r} holds an invalid config: {exc}") from exc
        dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(f"{name!r} mixes tensor dtypes {sorted(str(d) for d in dtypes)}; a model has one dtype")
        model = cls(config, device="meta")
        try:
            model.load_state_dict(state, assign=True)  # strict: no parameter stays on meta
        except RuntimeError as exc:
            raise ValueError(f"{name!r} does not match its config: {exc}") from exc
        weight = model.embed_tokens.weight
        model.rope_cos, model.rope_sin = model._rope_tables(weight.device, weight.dtype)
        return model

    def extra_repr(self) -> str:
        c = self.config
        return f"attention={c.attention!r}, layers={c.num_layers}, embed_dim={c.embed_dim}, vocab={c.vocab_size}"
