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
embedding, LM head, norms   replicated (plain tensors): the head is tied to the embedding
==========================  ============================================================

The degree P must divide the kv groups (``Hkv``), hence the heads; otherwise a ValueError.

**Context parallel** (:func:`context_parallel`) splits the sequence. With P ranks the sequence of
length N is cut into 2P chunks of ``c = N / 2P`` and rank r holds chunks ``r`` and ``2P − 1 − r``
(:func:`shard_sequence`), so every rank does the same causal work. In each layer, every rank
projects its own tokens, applies RoPE at their global positions, all-gathers K and V (the backward
reduce-scatters dK and dV) and runs the op twice: chunk ``r``'s queries against keys
``0 .. (r+1)·c − 1`` and chunk ``2P−1−r``'s against ``0 .. (2P−r)·c − 1``. The op's bottom-right
causal alignment (the queries are the last Lq positions of the keys) is exactly that chunk's view,
so every strategy runs unchanged. Parameter gradients are a rank's share: average them over the
context-parallel group (:func:`average_gradients`, or DDP/FSDP2 over a mesh that includes it).
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

from .layers import MultiheadDiffAttn
from .layers_v2 import MultiheadDiffAttnV2
from .models.attention import StandardAttention
from .models.transformer import CausalLMOutput, DiffTransformer

__all__ = [
    "average_gradients",
    "context_parallel",
    "sequence_positions",
    "shard_sequence",
    "tensor_parallel",
    "unshard_sequence",
]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


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


def tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
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

    Afterwards the module takes the same (replicated) inputs and returns the same outputs as
    before on every rank; the projection weights become DTensors sharded over the mesh (the plan
    is in the module docstring). Masks must broadcast over heads (head dim 1). ``generate`` and
    the KV cache work (each rank caches its own heads); ``return_attention`` is refused. For a 2-D
    ``dp × tp`` mesh apply this on ``mesh["tp"]`` first, then ``fully_shard(..., mesh=mesh["dp"])``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    mesh = _check_mesh(tp_mesh, "tp_mesh")
    p = mesh.size()
    if isinstance(module, DiffTransformer):
        attns = [block.attn for block in module.layers]
        for attn in attns:  # check every layer before changing any
            _tp_degree_check(attn, p)
        for block in module.layers:
            _tp_attention(block.attn, mesh)
            parallelize_module(block.ffn, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                 "down_proj": RowwiseParallel()})
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


def _cp_attend(q, k, v, lam, *, op, group, rank, world, attn_mask=None, is_causal=False, **kwargs):
    """The attention core over zigzag shards. q ``(B, maps, 2c, d)``, k and v this rank's keys."""
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported under context_parallel (the causal mask is); "
                         "pass attn_mask=None")
    lq = q.shape[2]
    if lq % 2 or k.shape[2] != lq:
        raise ValueError(f"under context_parallel q and k must hold this rank's two equal chunks, got "
                         f"{lq} queries and {k.shape[2]} keys")
    k = _GatherKV.apply(k, 2, group, world)  # (B, k_maps, N, d)
    v = _GatherKV.apply(v, 2, group, world)  # (B, Hkv, N, w)
    if not is_causal:  # every query sees every key; the order of the queries does not matter
        return op(q, k, v, lam, is_causal=False, **kwargs)
    c = lq // 2
    per_token = isinstance(lam, torch.Tensor) and lam.dim() == 3  # V2: (B, H, Lq)
    lam_a, lam_b = (lam[..., :c], lam[..., c:]) if per_token else (lam, lam)
    # Chunk r sees keys 0 .. (r+1)c - 1 and is their last c positions: bottom-right causal.
    end_a, end_b = (rank + 1) * c, (2 * world - rank) * c
    out_a = op(q[:, :, :c], k[:, :, :end_a], v[:, :, :end_a], lam_a, is_causal=True, **kwargs)
    out_b = op(q[:, :, c:], k[:, :, :end_b], v[:, :, :end_b], lam_b, is_causal=True, **kwargs)
    return torch.cat((out_a, out_b), dim=2)  # (B, H, 2c, w)


def _cp_layer_pre_hook(module, args, kwargs):
    mesh = module._sdpadiff_cp
    if kwargs.get("cache") is not None:
        raise ValueError("a KV cache is not supported under context_parallel (training and prefill only)")
    if (len(args) > 2 and args[2] is not None) or kwargs.get("attn_mask") is not None:
        raise ValueError("attn_mask is not supported under context_parallel (the causal mask is); "
                         "pass attn_mask=None")
    x = args[0] if args else kwargs.get("x")
    if isinstance(x, torch.Tensor) and x.dim() == 3 and kwargs.get("position_ids") is None:
        b, length = x.shape[:2]
        if length % 2:
            raise ValueError(f"x must hold this rank's two equal sequence chunks, got L = {length}")
        pos = sequence_positions(length * mesh.size(), mesh, device=x.device)
        kwargs = {**kwargs, "position_ids": pos.expand(b, length)}
    return args, kwargs


def _cp_check(attn: nn.Module) -> None:
    if not isinstance(attn, (MultiheadDiffAttn, MultiheadDiffAttnV2)):
        raise TypeError(f"context_parallel supports MultiheadDiffAttn and MultiheadDiffAttnV2 layers, "
                        f"got {type(attn).__name__}")
    if getattr(attn, "_sdpadiff_cp", None) is not None:
        raise ValueError(f"{type(attn).__name__} is already context-parallel")


def _cp_apply(attn: nn.Module, mesh: DeviceMesh) -> None:
    op = type(attn)._attend
    group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()

    def attend(q, k, v, lam, **kwargs):
        return _cp_attend(q, k, v, lam, op=op, group=group, rank=rank, world=world, **kwargs)

    attn._attend = attend
    attn._sdpadiff_cp = mesh
    attn.register_forward_pre_hook(_cp_layer_pre_hook, with_kwargs=True)


def _cp_lm_forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, *,
                   return_attention=False):
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
    if position_ids is None:
        position_ids = sequence_positions(total, mesh, device=input_ids.device).expand(b, length)
    out = type(self).forward(self, input_ids, position_ids=position_ids)
    if labels is None:
        return out
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (b, length):
        raise ValueError(f"labels must be this rank's (B, L)={(b, length)} shard, got {tuple(getattr(labels, 'shape', ()))}")
    # Position t predicts label t + 1, which may live on another rank: gather the (small) labels.
    full = _all_gather_seq(labels, 1, mesh.get_group(), world)  # (B, N)
    targets = shard_sequence(F.pad(full[:, 1:], (0, 1), value=-100), mesh, 1)  # (B, L)
    work = torch.promote_types(out.logits.dtype, torch.float32)
    local_sum = F.cross_entropy(out.logits.flatten(0, 1).to(work), targets.flatten(), ignore_index=-100,
                                reduction="sum")
    stats = torch.stack((local_sum.detach(), (targets != -100).sum().to(work)))
    dist.all_reduce(stats, group=mesh.get_group())
    value = stats[0] / stats[1]
    # The value is the global mean; the gradient is this rank's share times P, so that averaging
    # the gradients over the group (as DDP and FSDP2 do) gives the gradient of the global mean.
    share = local_sum * world / stats[1]
    return CausalLMOutput(out.logits, share + (value - share).detach(), None)


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
    (:func:`sequence_positions`) unless ``position_ids`` are given. Any strategy (``impl``) runs.
    Not supported: ``attn_mask``/``attention_mask``, a KV cache, ``return_attention``.

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

