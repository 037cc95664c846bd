"""A per-layer key/value cache for incremental decoding.

The cache stores keys and values after RoPE, in the op's compact layout: keys ``(B, 2Hkv, S, d)``
and values ``(B, Hkv, S, 2d)``. GQA stays compact (``Hkv`` groups, never repeated), so memory
scales with ``num_kv_heads``. All sequences of a batch share one length; left padding is expressed
by the caller's mask and ``position_ids``, as in transformers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "transaction"]


class KVCache:
    """Keys and values of one attention layer.

    ``KVCache()`` grows as needed (its buffers double, so appending a token costs O(1) amortised
    copies). ``KVCache(max_len, batch_size)`` is preallocated: its buffers have a static shape
    (friendly to ``torch.compile`` and CUDA graphs) and are allocated at the first write, when the
    head counts, dtype and device become known, unless ``num_kv_heads``/``head_dim`` (the layer's
    ``Hkv`` groups and map width ``d``), ``device`` and ``dtype`` are given. Writing past
    ``max_len`` raises a ValueError and leaves the cache as it was.

    ``len(cache)`` is the number of cached positions; :meth:`reset` empties the cache for reuse.

    ``KVCache(keep=n)`` is a rolling cache for a sliding-window layer: it holds only the last ``n``
    positions (``n = W - 1`` for ``sliding_window = W``), so its memory is O(W) however long the
    sequence. :meth:`update` still returns the kept positions *and* all the new ones, which is
    every key a windowed query can see. ``len(cache)`` is then the kept count and
    :attr:`seen_tokens` the number of positions written since the last reset (the absolute
    position of the next token, for RoPE); for other caches they are equal.

    ``KVCache(batch_size=B, ragged=True)`` holds ``B`` sequences of different lengths
    (:attr:`cache_seqlens`, as ``flash_attn_with_kvcache``'s ``cache_seqlens``), so a batch decodes
    without left padding: row ``b``'s new positions are written at ``cache_seqlens[b]``, and the
    layers let its queries see only its own ``cache_seqlens[b] + L`` keys (positions past a row's
    length hold zeros or stale values that no query sees). :meth:`update_packed` fills it from a
    packed prefill (document ``b`` into row ``b``). ``len(cache)`` is the longest row. Writes are
    always out of place.

    Writes are in place under ``torch.no_grad()`` or ``torch.inference_mode()`` (use one of them to
    decode). While autograd records, writes are out of place, so gradients flow through every
    cached step; each step then copies the cache, and autograd keeps every version.

    A layer call that raises leaves the cache exactly as it was: the layers run inside
    :func:`transaction`, which undoes every write of the failed call (its length, its buffers and
    the buffer contents it overwrote).
    """

    def __init__(
        self,
        max_len: int | None = None,
        batch_size: int | None = None,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        keep: int | None = None,
        ragged: bool = False,
    ):
        if not isinstance(ragged, bool):
            raise TypeError(f"ragged must be a bool, got {type(ragged).__name__}")
        if ragged and (batch_size is None or max_len is not None or keep is not None):
            raise ValueError("a ragged cache needs batch_size and neither max_len nor keep: "
                             "KVCache(batch_size=B, ragged=True)")
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
                raise ValueError(f"keep must be an int >= 0 (positions a rolling cache keeps) or None, got {keep!r}")
            if max_len is not None:
                raise ValueError("a rolling cache (keep=...) grows to at most keep positions; do not give max_len")
        for name, value in (("max_len", max_len), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if (max_len is None) != (batch_size is None) and not ragged:
            raise ValueError("give both max_len and batch_size for a preallocated cache, or neither")
        self.max_len = max_len
        self.batch_size = batch_size
        self.keep = keep
        self.ragged = ragged
        self._seqlens: torch.Tensor | None = None  # (B,) int64, ragged caches only
        self._len = 0
        self._seen = 0
        self._k: torch.Tensor | None = None  # (B, 2Hkv, capacity, d)
        self._v: torch.Tensor | None = None  # (B, Hkv, capacity, 2d)
        # While a transaction is open: (buffer, start, old contents) of every in-place write.
        self._journal: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None
        if max_len is not None and num_kv_heads is not None and head_dim is not None:
            dev, dt = torch.device(device or "cpu"), dtype or torch.float32
            self._allocate(batch_size, 2 * num_kv_heads, head_dim, num_kv_heads, 2 * head_dim, max_len, dev, dt)

    @property
    def is_static(self) -> bool:
        return self.max_len is not None

    def __len__(self) -> int:
        return self._len

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def seen_tokens(self) -> int:
        """Positions written since the last reset; ``len(self)`` except for a rolling cache."""
        return self._seen if self.is_rolling else self._len

    @property
    def is_rolling(self) -> bool:
        return self.keep is not None

    @property
    def is_ragged(self) -> bool:
        return self.ragged

    @property
    def cache_seqlens(self) -> torch.Tensor:
        """Ragged caches: the cached length of each row, int64 ``(B,)`` (zeros before the first write)."""
        if not self.ragged:
            raise ValueError("cache_seqlens exists for a ragged cache only (KVCache(batch_size=B, ragged=True))")
        if self._seqlens is None:
            dev = self._k.device if self._k is not None else "cpu"
            return torch.zeros(self.batch_size, dtype=torch.int64, device=dev)
        return self._seqlens

    def __repr__(self) -> str:
        kind = f"static max_len={self.max_len}, batch_size={self.batch_size}" if self.is_static else "growing"
        if self.is_rolling:
            kind = f"rolling keep={self.keep}, seen={self._seen}"
        return f"KVCache({kind}, len={self._len})"

    def reset(self) -> None:
        """Forget every cached position; preallocated buffers are kept for reuse."""
        self._len = 0
        self._seen = 0
        self._seqlens = None
        if not self.is_static:
            self._k = self._v = None
        elif self._k is not None and self._k.grad_fn is not None:
            self._k, self._v = self._k.detach(), self._v.detach()  # drop the last pass's graph

    def keys(self) -> torch.Tensor:
        """The cached keys, ``(B, 2Hkv, len, d)`` (a view)."""
        if self._k is None:
            raise ValueError("the cache is empty")
        return self._k[:, :, : self._len]

    def values(self) -> torch.Tensor:
        """The cached values, ``(B, Hkv, len, 2d)`` (a view)."""
        if self._v is None:
            raise ValueError("the cache is empty")
        return self._v[:, :, : self._len]

    def _allocate(self, b, hk, dk, hv, dv, capacity, device, dtype):
        self._k = torch.zeros(b, hk, capacity, dk, device=device, dtype=dtype)
        self._v = torch.zeros(b, hv, capacity, dv, device=device, dtype=dtype)

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[0] != v.shape[0] or k.shape[2] != v.shape[2]:
            raise ValueError(f"k must be (B, 2Hkv, L, d) and v (B, Hkv, L, 2d), got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.batch_size is not None and k.shape[0] != self.batch_size:
            raise ValueError(f"the cache holds batch_size {self.batch_size}, got a batch of {k.shape[0]}")
        if self._k is not None:
            want_k = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            want_v = (self._v.shape[0], self._v.shape[1], self._v.shape[3])
            if (k.shape[0], k.shape[1], k.shape[3]) != want_k or (v.shape[0], v.shape[1], v.shape[3]) != want_v:
                raise ValueError(
                    f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cached (B, heads, ·, width) "
                    f"{want_k} / {want_v}"
                )
            if k.dtype != self._k.dtype or k.device != self._k.device:
                raise ValueError(f"the cache holds {self._k.dtype} on {self._k.device}, got {k.dtype} on {k.device}")

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k (B, 2Hkv, L, d)`` and ``v (B, Hkv, L, 2d)``; return every cached key and value."""
        self._check(k, v)
        if self.is_rolling:
            return self._roll(k, v)
        if self.ragged:
            old = self.cache_seqlens.to(k.device)
            idx = old[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, L) row-wise positions
            return self._ragged_write(k, v, old + k.shape[2], idx)
        new_len = self._len + k.shape[2]
        if self.is_static and new_len > self.max_len:
            raise ValueError(
                f"writing {k.shape[2]} positions after {self._len} would exceed the cache's max_len "
                f"{self.max_len}; nothing was written"
            )
        if self._k is None:
            capacity = self.max_len if self.is_static else max(new_len, 16)
            self._allocate(k.shape[0], k.shape[1], k.shape[3], v.shape[1], v.shape[3], capacity, k.device, k.dtype)
        # While autograd records, an in-place write could overwrite keys that an earlier step saved
        # for its backward (even when only q requires grad), so writes are out of place.
        if torch.is_grad_enabled():
            # Out of place, so that autograd keeps every version it needs.
            if self.is_static:
                idx = torch.arange(self._len, new_len, device=k.device)
                self._k = self._k.index_copy(2, idx, k)
                self._v = self._v.index_copy(2, idx, v)
            else:
                self._k = torch.cat((self._k[:, :, : self._len], k), dim=2)
                self._v = torch.cat((self._v[:, :, : self._len], v), dim=2)
        else:
            if new_len > self._k.shape[2]:  # growing cache: double the capacity
                old_k, old_v = self._k[:, :, : self._len], self._v[:, :, : self._len]
                self._allocate(k.shape[0], k.shape[1], k.shape[3], v.shape[1], v.shape[3],
                               max(new_len, 2 * self._k.shape[2]), k.device, k.dtype)
                self._k[:, :, : self._len] = old_k
                self._v[:, :, : self._len] = old_v
            if self._journal is not None:  # keep what the write overwrites, for a rollback
                for buf in (self._k, self._v):
                    self._journal.append((buf, self._len, buf[:, :, self._len : new_len].clone()))
            self._k[:, :, self._len : new_len] = k
            self._v[:, :, self._len : new_len] = v
        self._len = new_len
        return self.keys(), self.values()

    def update_packed(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ragged caches: append document ``b`` of a packed row ``k (1, 2Hkv, total, d)``, ``v (1, Hkv,
        total, 2d)`` (boundaries ``cu_seqlens``, Python ints) to row ``b``; return ``k, v`` unchanged."""
        if not self.ragged:
            raise ValueError("only a ragged cache (KVCache(batch_size=B, ragged=True)) takes packed documents")
        if k.dim() != 4 or k.shape[0] != 1 or len(cu_seqlens) - 1 != self.batch_size:
            raise ValueError(f"a packed row of {self.batch_size} documents (batch_size) is needed, got k of shape "
                             f"{tuple(k.shape)} and {len(cu_seqlens) - 1} documents")
        lens = torch.tensor([b - a for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False)], device=k.device)
        longest = int(lens.max())
        rows = [F.pad(t[0, :, a:b], (0, 0, 0, longest - (b - a))) for t in (k, v)
                for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False)]
        n = self.batch_size
        kk, vv = torch.stack(rows[:n]), torch.stack(rows[n:])  # (B, heads, longest, width), zero-padded
        self._check(kk, vv)
        old = self.cache_seqlens.to(k.device)
        idx = old[:, None] + torch.arange(longest, device=k.device)
        # Padding slots land past each row's new length, where no query looks.
        self._ragged_write(kk, vv, old + lens, idx)
        return k, v

    def _ragged_write(self, k, v, new_seqlens, idx):
        b, hk, length, dk = k.shape
        hv, dv = v.shape[1], v.shape[3]
        cap = int((idx[:, -1] + 1).max()) if length else self._len
        if self._k is None:
            self._allocate(b, hk, dk, hv, dv, cap, k.device, k.dtype)
        elif self._k.shape[2] < cap:
            grow = cap - self._k.shape[2]
            self._k, self._v = F.pad(self._k, (0, 0, 0, grow)), F.pad(self._v, (0, 0, 0, grow))
        self._k = self._k.scatter(2, idx[:, None, :, None].expand(b, hk, length, dk), k)
        self._v = self._v.scatter(2, idx[:, None, :, None].expand(b, hv, length, dv), v)
        self._seqlens = new_seqlens
        self._len = int(new_seqlens.max())
        upto = max(self._len, cap)
        return self._k[:, :, :upto], self._v[:, :, :upto]

    def _roll(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rolling update: return kept + new positions, then keep only the last ``keep`` of them."""
        if self._k is None or self._len == 0:
            full_k, full_v = k, v
        else:
            full_k = torch.cat((self._k[:, :, : self._len], k), dim=2)
            full_v = torch.cat((self._v[:, :, : self._len], v), dim=2)
        n = min(self.keep, full_k.shape[2])
        # A copy, not a view: a view of a long prefill would keep all of it alive.
        self._k = full_k[:, :, full_k.shape[2] - n :].clone()
        self._v = full_v[:, :, full_v.shape[2] - n :].clone()
        self._len = n
        self._seen += k.shape[2]
        return full_k, full_v
    # Transactions (see :func:`transaction`). A mark is the state to return to on failure.

    def _begin(self) -> tuple:
        outer = self._journal is None
        if outer:
            self._journal = []
        return len(self._journal), self._len, self._k, self._v, self._seen, self._seqlens, outer

    def _rollback(self, mark: tuple) -> None:
        n, length, k, v, seen, seqlens, _ = mark
        with torch.no_grad():  # inference_mode, if the failed call ran in it, is still active here
            while len(self._journal) > n:
                buf, start, old = self._journal.pop()
                buf[:, :, start : start + old.shape[2]] = old
        self._len, self._k, self._v, self._seen, self._seqlens = length, k, v, seen, seqlens

    def _end(self, mark: tuple) -> None:
        if mark[-1]:
            self._journal = None


class _Transaction:
    """Undo every cache write made inside the ``with`` block if the block raises."""

    def __init__(self, caches):
        self.caches = [c for c in caches if isinstance(c, KVCache)]  # the layers refuse anything else
        self.marks: list[tuple] = []

    def __enter__(self):
        self.marks = [c._begin() for c in self.caches]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for cache, mark in zip(self.caches, self.marks, strict=True):
            if exc_type is not None:
                cache._rollback(mark)
            cache._end(mark)
        return False


def transaction(*caches: KVCache | None) -> contextlib.AbstractContextManager:
    """``with transaction(cache, ...):`` — if the block raises, every given cache is restored.

    ``None`` entries are ignored, and transactions nest (a layer's inside the model's). The undo
    record is the length, the buffer references and a copy of the positions an in-place write
    overwrites (``L`` positions per call, the size of the write itself).

    Inside a ``torch.compile`` region it does nothing. With ``fullgraph=True`` Dynamo applies the
    cache's Python state (its length and buffer references) only after the whole graph has run, so
    a call that fails while tracing or running leaves ``len(cache)`` and what ``keys()`` and
    ``values()`` return as they were (a failed graph may have written positions past the length,
    which no read sees and the next write overwrites).
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _Transaction(caches)
