"""Tensor and context parallelism for the differential layers and :class:`DiffTransformer`, on torch.distributed.

Nothing here is imported by ``import multihead_sdpadiff``; import ``multihead_sdpadiff.parallel``.

**Tensor parallel** (:func:`tensor_parallel`) splits heads across the ranks of a 1-D mesh with
``torch.distributed.tensor.parallel`` plans, as Megatron and unilm's ``model_parallel_size`` do:

==========================  ============================================================
module                      plan
==========================  ============================================================
``q_proj k_proj v_proj``    ``ColwiseParallel``: rank r holds heads ``r·H/P .. (r+1)·H/P − 1``
                            and their kv groups (H/Hkv = n_rep is the same on every rank)
``out_proj`` / ``o_proj``   ``RowwiseParallel``: the partial outputs are summed (all-reduce)
λ (``lambda_q1`` …)         replicated DTensors; each rank's gradient covers its heads and is
``subln``                   summed over the mesh (``Partial`` → ``Replicate``)
V2 ``lambda_proj``          ``ColwiseParallel``: split by head, like q
SwiGLU                      ``gate_proj``/``up_proj`` colwise, ``down_proj`` rowwise
norms                       replicated (plain tensors)
embedding and tied LM head  replicated by default; with ``vocab_parallel=True`` the one tied
                            weight ``(V, E)`` is sharded by vocab row (``RowwiseParallel`` on
                            the embedding: masked lookup, then an all-reduce), the head computes
                            the rank's ``V/P`` logit columns and the logits are all-gathered
==========================  ============================================================

The degree P must divide the kv groups (``Hkv``), hence the heads (and, with ``vocab_parallel``,
``vocab_size``); otherwise a ValueError.

**Context parallel** (:func:`context_parallel`) splits the sequence. With P ranks the sequence of
length N is cut into 2P chunks of ``c = N / 2P`` and rank r holds chunks ``r`` and ``2P − 1 − r``
(:func:`shard_sequence`), so every rank does the same causal work. In each layer, every rank
projects its own tokens, applies RoPE at their global positions, all-gathers K and V (the backward
reduce-scatters dK and dV) and runs the op twice: chunk ``r``'s queries against keys
``0 .. (r+1)·c − 1`` and chunk ``2P−1−r``'s against ``0 .. (2P−r)·c − 1``. The op's bottom-right
causal alignment (the queries are the last Lq positions of the keys) is exactly that chunk's view,
so every strategy runs unchanged. A window ``(left, ·)`` keeps that meaning and cuts the chunk's
keys to the last ``c + left`` of the prefix. Packed documents (``cu_seqlens``: global boundaries,
B = 1) become, per chunk, the op's packed layout over the documents the chunk touches, so a query
sees only keys of its own document, with causal mask, window and RoPE positions per document.
Parameter gradients are a rank's share: average them over the context-parallel group
(:func:`average_gradients`, or DDP/FSDP2 over a mesh that includes it).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from .layers import MultiheadDiffAttn, check_position_ids, check_rel_pos
from .layers_v2 import MultiheadDiffAttnV2
from .masks import check_cu_seqlens, check_window
from .models.attention import StandardAttention
from .models.transformer import CausalLMOutput, DiffTransformer, check_labels
from .ops import diff_attention, diff_attention_varlen
from .ops.v2 import diff_attention_v2, diff_attention_v2_varlen

__all__ = [
    "average_gradients",
    "context_parallel",
    "sequence_positions",
    "shard_sequence",
    "tensor_parallel",
    "unshard_sequence",
]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
#: The packed (varlen) form of each layer op, for packed sequences under context parallelism.
_VARLEN = {diff_attention: diff_attention_varlen, diff_attention_v2: diff_attention_v2_varlen}


def _check_mesh(mesh, name: str) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{name} must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"{name} must be 1-D (take a sub-mesh, e.g. mesh['tp']), got {mesh.ndim} dims")
    return mesh


# ----------------------------------------------------------------------------- tensor parallel


def _replicate_grad(param: torch.Tensor) -> None:
    # A replicated parameter used on head-sharded activations gets a Partial gradient (each rank's
    # heads only); make it the full Replicate gradient that optimizers and clipping expect.
    # (FSDP2 does this itself for the parameters it manages.)
    g = param.grad
    if isinstance(g, DTensor) and any(p.is_partial() for p in g.placements):
        param.grad = g.redistribute(g.device_mesh, param.placements)


def _replicate_param(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    p = getattr(module, name)
    new = nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]), requires_grad=p.requires_grad)
    new.register_post_accumulate_grad_hook(_replicate_grad)
    module.register_parameter(name, new)


class _HeadShardedReplicate(ParallelStyle):
    """Replicated parameters for a module whose input is head-sharded: ``(B, H/P, L, w)`` per rank.

    The input becomes a DTensor sharded on dim 1, so DTensor's own rules compute the op and sum
    the parameter gradients over the mesh; the output is the local tensor again.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for pname, _ in list(mod.named_parameters(recurse=False)):
                _replicate_param(mod, pname, mesh)

        def inputs(mod, args, mesh):
            return tuple(DTensor.from_local(a, mesh, [Shard(1)], run_check=False) if isinstance(a, torch.Tensor)
                         else a for a in args)

        def outputs(mod, out, mesh):
            return out.to_local()

        return distribute_module(module, device_mesh, partition, inputs, outputs)


def _tp_lambda_full(self) -> torch.Tensor:
    # λ from the replicated DTensor parameters, as the local 0-dim tensor the op takes. Its
    # gradient on each rank covers that rank's heads only, hence Partial.
    return type(self).lambda_full(self).to_local(grad_placements=[Partial()])


def _tp_degree_check(attn: nn.Module, p: int) -> None:
    if isinstance(attn, MultiheadDiffAttn):
        groups, what = attn.num_kv_heads, "kv groups (num_kv_heads // 2)"
    elif isinstance(attn, (MultiheadDiffAttnV2, StandardAttention)):
        groups, what = attn.num_kv_heads, "kv heads (num_kv_heads)"
    else:
        raise TypeError(f"tensor_parallel does not know {type(attn).__name__}")
    if groups % p:
        raise ValueError(
            f"tp_mesh of size {p} must divide the {groups} {what} of {type(attn).__name__} "
            f"({attn.num_heads} heads): every rank needs whole heads and their kv groups"
        )
    if getattr(attn, "_sdpadiff_tp", None) is not None:
        raise ValueError(f"{type(attn).__name__} is already tensor-parallel")


def _tp_attention(attn: nn.Module, mesh: DeviceMesh) -> None:
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel()}
    if isinstance(attn, MultiheadDiffAttn):
        plan.update(out_proj=RowwiseParallel(), subln=_HeadShardedReplicate())
        parallelize_module(attn, mesh, plan)
        for name in _LAMBDAS:
            _replicate_param(attn, name, mesh)
        attn.lambda_full = types.MethodType(_tp_lambda_full, attn)
    elif isinstance(attn, MultiheadDiffAttnV2):
        plan.update(lambda_proj=ColwiseParallel(), o_proj=RowwiseParallel())
        parallelize_module(attn, mesh, plan)
    else:  # StandardAttention
        plan.update(out_proj=RowwiseParallel())
        parallelize_module(attn, mesh, plan)
    attn._sdpadiff_tp = mesh


def _tp_lm_pre_hook(module, args, kwargs):
    if kwargs.get("return_attention"):
        raise ValueError("return_attention is not supported under tensor_parallel: the maps are recomputed "
                         "with every head, and a rank holds only its own")
    return args, kwargs


def _vocab_head_input(module, args, output):
    # The final norm's output feeds only the LM head: as a replicated DTensor it multiplies the
    # vocab-sharded weight into vocab-sharded logits (and its gradient is summed over the mesh).
    return DTensor.from_local(output, module._sdpadiff_vocab_mesh, [Replicate()], run_check=False)


def _plain_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-sharded DTensor logits as the full ``(B, L, V)`` tensor on every rank (an all-gather
    whose backward hands each rank its vocab slice of the gradient); other logits unchanged."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def _tp_vocab_lm_forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, *,
                         return_attention=False, cu_seqlens=None):
    """DiffTransformer.forward with a vocab-parallel head: the logits are gathered, then the loss."""
    if labels is not None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        check_labels(labels, *input_ids.shape, self.config.vocab_size)
    packed = {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {}
    out = type(self).forward(self, input_ids, attention_mask, position_ids, cache, None,
                             return_attention=return_attention, **packed)
    logits = _plain_logits(out.logits)  # (B, L, V)
    loss = None
    if labels is not None:  # as DiffTransformer.forward computes it
        work = torch.promote_types(logits.dtype, torch.float32)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(work), labels[:, 1:].flatten(), ignore_index=-100)
    return CausalLMOutput(logits, loss, out.attentions)


def _tp_vocab_check(module: nn.Module, p: int) -> None:
    if not isinstance(module, DiffTransformer):
        raise TypeError(f"vocab_parallel=True applies to a DiffTransformer (its embedding and LM head), "
                        f"got {type(module).__name__}")
    if getattr(module, "_sdpadiff_cp", None) is not None:
        raise ValueError("apply tensor_parallel(..., vocab_parallel=True) before context_parallel: the "
                         "context-parallel loss reads the gathered logits")
    vocab = module.config.vocab_size
    if vocab % p:
        raise ValueError(f"vocab_parallel=True: tp_mesh of size {p} must divide vocab_size {vocab} "
                         f"(pad the vocabulary to a multiple of {p})")


def _tp_vocab(module: DiffTransformer, mesh: DeviceMesh) -> None:
    # One parameter, the tied embedding/head weight (V, E), sharded by vocab row: the lookup masks
    # the ids outside a rank's rows and sums the partial embeddings (RowwiseParallel on
    # nn.Embedding); the head F.linear(norm(x), weight) gives logits sharded by vocab column.
    parallelize_module(module, mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate())})
    module.norm._sdpadiff_vocab_mesh = mesh
    module.norm.register_forward_hook(_vocab_head_input)
    module.forward = types.MethodType(_tp_vocab_lm_forward, module)


def tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, *, vocab_parallel: bool = False) -> nn.Module:
    """Split ``module``'s heads (and a DiffTransformer's SwiGLU) over ``tp_mesh``, in place; return it.

    Args:
        module: a :class:`~multihead_sdpadiff.MultiheadDiffAttn`,
            :class:`~multihead_sdpadiff.MultiheadDiffAttnV2`,
            :class:`~multihead_sdpadiff.models.StandardAttention` or
            :class:`~multihead_sdpadiff.DiffTransformer`, built identically on every rank (the
            weights are taken from rank 0).
        tp_mesh: a 1-D DeviceMesh of size P. P must divide every layer's kv groups (``Hkv``:
            ``num_kv_heads // 2`` for MultiheadDiffAttn, ``num_kv_heads`` for V2), else a
            ValueError and the module is left unchanged.
        vocab_parallel: DiffTransformer only; default False. False keeps the tied embedding / LM
            head weight ``(V, E)`` replicated (no communication for it). True shards it by vocab
            row: rank r holds rows ``r·V/P .. (r+1)·V/P − 1`` of the one tied parameter, the
            lookup sums the ranks' partial embeddings (one all-reduce of ``(B, L, E)``), the head
            computes its ``V/P`` logit columns and the logits are all-gathered to ``(B, L, V)`` on
            every rank, from which the loss is computed as without parallelism. P must divide
            ``vocab_size``. Apply it before :func:`context_parallel`, not after.

    Afterwards the module takes the same (replicated) inputs and returns the same outputs as
    before on every rank; the projection weights become DTensors sharded over the mesh (the plan
    is in the module docstring). Masks must broadcast over heads (head dim 1). ``generate`` and
    the KV cache work (each rank caches its own heads); ``return_attention`` is refused. For a 2-D
    ``dp × tp`` mesh apply this on ``mesh["tp"]`` first, then ``fully_shard(..., mesh=mesh["dp"])``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    mesh = _check_mesh(tp_mesh, "tp_mesh")
    if not isinstance(vocab_parallel, bool):
        raise TypeError(f"vocab_parallel must be a bool, got {type(vocab_parallel).__name__}")
    p = mesh.size()
    if vocab_parallel:
        _tp_vocab_check(module, p)
    if isinstance(module, DiffTransformer):
        attns = [block.attn for block in module.layers]
        for attn in attns:  # check every layer before changing any
            _tp_degree_check(attn, p)
        for block in module.layers:
            _tp_attention(block.attn, mesh)
            parallelize_module(block.ffn, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                 "down_proj": RowwiseParallel()})
        if vocab_parallel:
            _tp_vocab(module, mesh)
        module.register_forward_pre_hook(_tp_lm_pre_hook, with_kwargs=True)
        return module
    _tp_degree_check(module, p)
    _tp_attention(module, mesh)
    return module


# ---------------------------------------------------------------------------- context parallel


def _zigzag_check(length: int, world: int, what: str) -> int:
    if length % (2 * world):
        raise ValueError(f"{what} {length} must be a multiple of 2 × cp_mesh size = {2 * world} "
                         f"(2P chunks, zigzag)")
    return length // (2 * world)


def shard_sequence(t: torch.Tensor, cp_mesh: DeviceMesh, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full sequence ``t``: chunks ``r`` and ``2P − 1 − r`` of 2P, concatenated.

    ``t`` is the full tensor (the same on every rank) with the sequence along ``dim``, whose length
    must be a multiple of 2P. Returns a tensor with ``N / P`` positions along ``dim``. Gradients
    flow back into ``t``'s slices.
    """
    mesh = _check_mesh(cp_mesh, "cp_mesh")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor, got {type(t).__name__}")
    world, rank = mesh.size(), mesh.get_local_rank()
    _zigzag_check(t.shape[dim], world, f"sequence length (dim {dim})")
    chunks = t.chunk(2 * world, dim)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]), dim)


def _from_ranks(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """``(P·2c, ...)`` in rank order (rank r: chunks r, 2P−1−r) to ``(N, ...)`` in sequence order."""
    per = gathered.view(world, 2, -1, *gathered.shape[1:])  # (P, 2, c, ...)
    return torch.cat((per[:, 0].flatten(0, 1), per[:, 1].flip(0).flatten(0, 1)))


def _to_ranks(full: torch.Tensor, world: int) -> torch.Tensor:
    """Inverse of :func:`_from_ranks`."""
    c = full.shape[0] // (2 * world)
    ch = full.view(2 * world, c, *full.shape[1:])
    return torch.stack((ch[:world], ch[world:].flip(0)), dim=1).flatten(0, 2)  # (P·2c, ...)


def _all_gather_seq(x: torch.Tensor, dim: int, group, world: int) -> torch.Tensor:
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((world * xt.shape[0], *xt.shape[1:]))
    dist.all_gather_single(out, xt, group=group)
    return _from_ranks(out, world).movedim(0, dim).contiguous()


class _GatherKV(torch.autograd.Function):
    """All-gather the zigzag shards into the full sequence; backward: reduce-scatter (sum) the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, world):
        ctx.dim, ctx.group, ctx.world = dim, group, world
        return _all_gather_seq(x, dim, group, world)

    @staticmethod
    def backward(ctx, grad):
        g = _to_ranks(grad.movedim(ctx.dim, 0), ctx.world).contiguous()
        out = g.new_empty((g.shape[0] // ctx.world, *g.shape[1:]))
        dist.reduce_scatter_single(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None, None


class _Unshard(torch.autograd.Function):
    """All-gather; backward: this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, world, rank):
        ctx.dim, ctx.world, ctx.rank = dim, world, rank
        return _all_gather_seq(x, dim, group, world)

    @staticmethod
    def backward(ctx, grad):
        chunks = grad.chunk(2 * ctx.world, ctx.dim)
        return torch.cat((chunks[ctx.rank], chunks[2 * ctx.world - 1 - ctx.rank]), ctx.dim), None, None, None, None


def unshard_sequence(t: torch.Tensor, cp_mesh: DeviceMesh, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's :func:`shard_sequence` part (an all-gather), on every rank.

    The result is treated as replicated: its backward hands each rank its own slice of the
    gradient, which is right when every rank computes the same function of the full tensor.
    """
    mesh = _check_mesh(cp_mesh, "cp_mesh")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor, got {type(t).__name__}")
    if t.shape[dim] % 2:
        raise ValueError(f"t must hold two equal chunks along dim {dim}, got length {t.shape[dim]}")
    return _Unshard.apply(t, dim % t.dim(), mesh.get_group(), mesh.size(), mesh.get_local_rank())


def sequence_positions(length: int, cp_mesh: DeviceMesh, device=None) -> torch.Tensor:
    """The global positions ``(length / P,)`` of this rank's tokens for a sequence of ``length``."""
    mesh = _check_mesh(cp_mesh, "cp_mesh")
    _zigzag_check(length, mesh.size(), "length")
    return shard_sequence(torch.arange(length, device=device), mesh, 0)


def _doc_starts(bounds: tuple[int, ...], total: int, device) -> torch.Tensor:
    """Each position's document start ``(total,)``, from packed boundaries ``(0, ..., total)``."""
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:], strict=False)], device=device)
    return torch.tensor(bounds[:-1], device=device).repeat_interleave(lengths, output_size=total)


def _chunk_layout(docs, s: int, e: int, k0: int, k1: int, whole_docs: bool):
    """The packed layout of query chunk ``[s, e)`` against keys ``[k0, k1)``.

    Returns ``(k0, k1, cu_q, cu_k)``: the key range narrowed to the documents the chunk touches
    (whole documents when ``whole_docs``, else up to ``k1``), and the boundaries of those documents
    inside the chunk's queries and inside that key range. Every document listed has queries and keys.
    """
    touched = [(a, b) for a, b in zip(docs, docs[1:], strict=False) if a < e and b > s]  # non-empty ones
    if whole_docs:
        k0, k1 = touched[0][0], touched[-1][1]
    else:
        k0 = max(k0, touched[0][0])
    cu_q, cu_k = [0], [0]
    for _, b in touched:
        cu_q.append(min(b, e) - s)
        cu_k.append(min(b, k1) - k0)
    return k0, k1, cu_q, cu_k


def _cp_attend(self, q, k, v, lam, *, attn_mask=None, is_causal=False, window=None, **kwargs):
    """The attention core over zigzag shards (bound to a context-parallel layer as ``_attend``).

    q ``(B, maps, 2c, d)``, k and v this rank's keys and values; ``self._sdpadiff_cp_docs`` holds
    the packed documents' global boundaries of the current call (set by the pre-hook), or None.
    """
    mesh, docs = self._sdpadiff_cp, self._sdpadiff_cp_docs
    group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    op = type(self)._attend
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported under context_parallel (the causal mask is); "
                         "pass attn_mask=None")
    lq = q.shape[2]
    if lq % 2 or k.shape[2] != lq:
        raise ValueError(f"under context_parallel q and k must hold this rank's two equal chunks, got "
                         f"{lq} queries and {k.shape[2]} keys")
    left, right = check_window(window)
    # A query at position p sees keys up to p when the mask is causal or the window's right edge is
    # 0: then each chunk is the last c positions of a key prefix (the op's bottom-right alignment).
    banded = is_causal or right == 0
    if not banded and (left, right) != (-1, -1):
        raise ValueError(f"window={window!r} without is_causal is not supported under context_parallel: a "
                         f"query would see keys after its own chunk, which the bottom-right alignment cannot "
                         f"place. Supported: any window with is_causal=True, or (left, 0); the layers' "
                         f"sliding_window gives (W - 1, 0)")
    if docs is not None and op not in _VARLEN:
        raise ValueError(f"packed sequences under context_parallel need the package's own op as _attend, "
                         f"got {getattr(op, '__name__', op)!r}")
    k = _GatherKV.apply(k, 2, group, world)  # (B, k_maps, N, d)
    v = _GatherKV.apply(v, 2, group, world)  # (B, Hkv, N, w)
    if not banded and docs is None:  # every query sees every key; the order of the queries does not matter
        return op(q, k, v, lam, is_causal=False, window=window, **kwargs)
    c = lq // 2
    per_token = isinstance(lam, torch.Tensor) and lam.dim() == 3  # V2: (B, H, Lq)
    outs = []
    for i, chunk in enumerate((rank, 2 * world - 1 - rank)):
        s, e = chunk * c, (chunk + 1) * c  # the chunk's global positions
        qc = q[:, :, i * c:(i + 1) * c]
        lam_c = lam[..., i * c:(i + 1) * c] if per_token else lam
        # Keys: the prefix that ends with the chunk; a left window cuts its start to s - left.
        k0, k1 = (max(0, s - left) if left >= 0 else 0), e
        if not banded:
            k0, k1 = 0, k.shape[2]
        if docs is None:
            outs.append(op(qc, k[:, :, k0:k1], v[:, :, k0:k1], lam_c, is_causal=is_causal, window=window, **kwargs))
            continue
        # Packed: the chunk's queries against the keys of the documents they belong to, document by
        # document (the op aligns causal and window bottom-right per document, so each query keeps
        # its position inside its document).
        k0, k1, cu_q, cu_k = _chunk_layout(docs, s, e, k0, k1, whole_docs=not banded)
        cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=q.device)
        cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=q.device)
        longest_q = max(b - a for a, b in zip(cu_q, cu_q[1:], strict=False))
        longest_k = max(b - a for a, b in zip(cu_k, cu_k[1:], strict=False))
        if per_token:
            lam_c = lam_c[0].transpose(0, 1)  # (c, H)
        out = _VARLEN[op](qc[0].transpose(0, 1), k[0, :, k0:k1].transpose(0, 1), v[0, :, k0:k1].transpose(0, 1),
                          lam_c, cu_q_t, cu_k_t, longest_q, longest_k, is_causal=is_causal, window=window,
                          **kwargs)  # (c, H, w)
        outs.append(out.transpose(0, 1).unsqueeze(0))
    return torch.cat(outs, dim=2)  # (B, H, 2c, w)


def _get_arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


def _cp_layer_pre_hook(module, args, kwargs):
    """Refuse what CP cannot do; turn cu_seqlens and positions into the layout ``_cp_attend`` expects.

    The layer itself never sees ``cu_seqlens`` (it would attend inside this rank's shard only): the
    documents' global boundaries go to ``module._sdpadiff_cp_docs``, and RoPE gets this rank's
    positions, either as ``position_ids`` (B > 1) or, for one row, as tables gathered at those
    positions (a one-row call with ``position_ids`` that restart at 0 would read as packed).
    """
    mesh = module._sdpadiff_cp
    module._sdpadiff_cp_docs = None
    if kwargs.get("cache") is not None:
        raise ValueError("a KV cache is not supported under context_parallel (training and prefill only)")
    if _get_arg(args, kwargs, 2, "attn_mask") is not None:
        raise ValueError("attn_mask is not supported under context_parallel (the causal mask is); "
                         "pass attn_mask=None")
    x = _get_arg(args, kwargs, 0, "x")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return args, kwargs  # the layer raises its own error
    b, length = x.shape[:2]
    if length % 2:
        raise ValueError(f"x must hold this rank's two equal sequence chunks, got L = {length}")
    world, total = mesh.size(), length * mesh.size()
    kwargs = dict(kwargs)
    cu, pos = kwargs.pop("cu_seqlens", None), check_position_ids(kwargs.get("position_ids"), b, length)
    docs = None
    if cu is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens needs one packed row: x of shape (1, L, E), got {tuple(x.shape)}")
        docs = check_cu_seqlens(cu, "cu_seqlens (the documents' boundaries in the full sequence of L·P positions)",
                                total, x.device)
        if pos is None:  # RoPE restarts at 0 in every document
            full = torch.arange(total, device=x.device) - _doc_starts(docs, total, x.device)
            pos = shard_sequence(full, mesh, 0)[None]
    elif pos is not None and b == 1:
        # One row whose positions restart at 0 is packed (as in the layer): read the full row's.
        full = _all_gather_seq(pos.long(), 1, mesh.get_group(), world)[0]  # (N,)
        starts = ((full[1:] == 0).nonzero().flatten() + 1).tolist()
        if starts:
            docs = (0, *starts, total)
    if pos is None:
        pos = sequence_positions(total, mesh, device=x.device).expand(b, length)
    rel_pos = _get_arg(args, kwargs, 1, "rel_pos")
    if rel_pos is not None and b == 1:
        cos, sin = check_rel_pos(rel_pos, module.head_dim, None, x.device)
        p = pos[0].long()
        if length and (int(p.min()) < 0 or int(p.max()) >= cos.shape[0]):
            raise ValueError(f"position_ids must lie in [0, {cos.shape[0]}) (the rel_pos tables' rows), got "
                             f"values in [{int(p.min())}, {int(p.max())}]")
        rel_pos = (cos[p], sin[p])  # row l: this rank's token l
        if len(args) > 1:
            args = (args[0], rel_pos, *args[2:])
        else:
            kwargs["rel_pos"] = rel_pos
        pos = None
    kwargs["position_ids"] = pos if rel_pos is not None else None  # without RoPE nothing reads positions
    module._sdpadiff_cp_docs = docs
    return args, kwargs


def _cp_layer_post_hook(module, args, kwargs, output):
    module._sdpadiff_cp_docs = None
    return output


def _cp_check(attn: nn.Module) -> None:
    if not isinstance(attn, (MultiheadDiffAttn, MultiheadDiffAttnV2)):
        raise TypeError(f"context_parallel supports MultiheadDiffAttn and MultiheadDiffAttnV2 layers, "
                        f"got {type(attn).__name__}")
    if getattr(attn, "_sdpadiff_cp", None) is not None:
        raise ValueError(f"{type(attn).__name__} is already context-parallel")


def _cp_apply(attn: nn.Module, mesh: DeviceMesh) -> None:
    attn._attend = types.MethodType(_cp_attend, attn)
    attn._sdpadiff_cp = mesh
    attn._sdpadiff_cp_docs = None
    attn.register_forward_pre_hook(_cp_layer_pre_hook, with_kwargs=True)
    attn.register_forward_hook(_cp_layer_post_hook, with_kwargs=True, always_call=True)


def _cp_lm_forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, *,
                   return_attention=False, cu_seqlens=None):
    mesh = self._sdpadiff_cp
    world = mesh.size()
    if attention_mask is not None or cache is not None or return_attention:
        raise ValueError("under context_parallel DiffTransformer takes no attention_mask, cache or "
                         "return_attention (training on full, unpadded sequences)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be this rank's (B, N / P) shard, got {getattr(input_ids, 'shape', input_ids)!r}")
    b, length = input_ids.shape
    total = length * world
    if length % 2:
        raise ValueError(f"input_ids must hold this rank's two equal chunks, got L = {length}")
    if total > self.config.max_seq_len:
        raise ValueError(f"the full sequence of {total} positions exceeds max_seq_len {self.config.max_seq_len}")
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens needs one packed row: input_ids of shape (1, L), got {(b, length)}")
        check_cu_seqlens(cu_seqlens, "cu_seqlens (the documents' boundaries in the full sequence of L·P positions)",
                         total, input_ids.device)
    # Positions (global, or per document) are filled in by each layer's pre-hook.
    packed = {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {}
    out = type(self).forward(self, input_ids, position_ids=position_ids, **packed)
    if labels is None:
        return CausalLMOutput(_plain_logits(out.logits), None, None)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, length):
        raise ValueError(f"labels must be this rank's (B, L)={(b, length)} shard, got {tuple(getattr(labels, 'shape', ()))}")
    # Position t predicts label t + 1, which may live on another rank: gather the (small) labels.
    full = _all_gather_seq(labels, 1, mesh.get_group(), world)  # (B, N)
    targets = shard_sequence(F.pad(full[:, 1:], (0, 1), value=-100), mesh, 1)  # (B, L)
    logits = _plain_logits(out.logits)  # (B, L, V), also under a vocab-parallel head
    work = torch.promote_types(logits.dtype, torch.float32)
    local_sum = F.cross_entropy(logits.flatten(0, 1).to(work), targets.flatten(), ignore_index=-100,
                                reduction="sum")
    stats = torch.stack((local_sum.detach(), (targets != -100).sum().to(work)))
    dist.all_reduce(stats, group=mesh.get_group())
    value = stats[0] / stats[1]
    # The value is the global mean; the gradient is this rank's share times P, so that averaging
    # the gradients over the group (as DDP and FSDP2 do) gives the gradient of the global mean.
    share = local_sum * world / stats[1]
    return CausalLMOutput(logits, share + (value - share).detach(), None)


def context_parallel(module: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Make ``module`` take sequence shards over ``cp_mesh`` (in place); return it.

    Args:
        module: a :class:`~multihead_sdpadiff.MultiheadDiffAttn`,
            :class:`~multihead_sdpadiff.MultiheadDiffAttnV2` or a
            :class:`~multihead_sdpadiff.DiffTransformer` with differential attention.
        cp_mesh: a 1-D DeviceMesh of size P.

    Afterwards the module takes this rank's :func:`shard_sequence` part of the input (``N / P``
    positions, N a multiple of 2P) and returns this rank's part of the output; on every rank it is
    the same function of the full sequence as before. RoPE uses the global positions
    (:func:`sequence_positions`) unless ``position_ids`` (this rank's shard) are given. Any
    strategy (``impl``) runs.

    Masks that work: the causal mask; the layers' ``sliding_window`` (the op's ``window`` with
    ``is_causal``, or ``(left, 0)`` without); no mask with ``causal=False``; and packed documents.
    For packing pass ``cu_seqlens``, the int32 ``(docs + 1,)`` boundaries of the documents in the
    *full* row of ``N = L·P`` positions, the same tensor on every rank, with x of shape
    ``(1, L, E)`` (``input_ids (1, L)``); or one row of ``position_ids`` that restart at 0 at each
    document, as without parallelism (their full row is all-gathered to find the documents). A
    query then sees only its own document's keys, and RoPE restarts at 0 per document unless
    ``position_ids`` are given.

    Refused with a ValueError: ``attn_mask``/``attention_mask``, a KV cache, ``return_attention``,
    and a window that lets a query see later keys without ``is_causal`` (right > 0, or left >= 0
    with right = -1): a query chunk is placed as the last positions of its keys, so no key after
    the chunk can be given to it.

    ``DiffTransformer``: ``labels`` are this rank's shard of labels aligned with ``input_ids`` (as
    without parallelism); the shift to next-token targets crosses chunk boundaries. The returned
    ``loss`` is the mean over the full sequence on every rank, and its gradient is this rank's
    share scaled by P: average the parameter gradients over ``cp_mesh`` (:func:`average_gradients`)
    before the optimizer step.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    mesh = _check_mesh(cp_mesh, "cp_mesh")
    if isinstance(module, DiffTransformer):
        attns = [block.attn for block in module.layers]
        for attn in attns:
            _cp_check(attn)
        if getattr(module, "_sdpadiff_cp", None) is not None:
            raise ValueError("DiffTransformer is already context-parallel")
        for attn in attns:
            _cp_apply(attn, mesh)
        module._sdpadiff_cp = mesh
        module.forward = types.MethodType(_cp_lm_forward, module)
        return module
    _cp_check(module)
    _cp_apply(module, mesh)
    return module


def average_gradients(module: nn.Module, mesh: DeviceMesh) -> None:
    """Average every parameter gradient of ``module`` over ``mesh`` (all-reduce, then divide), in place.

    Use it over the context-parallel mesh before the optimizer step when no DDP/FSDP2 does.
    DTensor gradients (tensor-parallel parameters) are averaged shard by shard.
    """
    m = _check_mesh(mesh, "mesh")
    if m.size() == 1:
        return
    group = m.get_group()
    for p in module.parameters():
        if p.grad is None:
            continue
        g = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(g, group=group)
        g.div_(m.size())

