"""DiffTransformer's forward restated from its parameters in float64, for the tests only.

The differential layers go through ``tests.oracle.oracle_module`` (loops, complex-number RoPE);
the standard layer, RMSNorm and SwiGLU are written out here. Nothing is imported from the package.
"""

from __future__ import annotations

import math

import torch

from tests.oracle import F64, oracle_module, oracle_rope, visibility


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.to(F64)


def oracle_standard(mod, x, positions, bool_mask):
    """Causal softmax attention with GQA written as index arithmetic; ``x`` float64 ``(B, L, E)``."""
    b, length, e = x.shape
    h, hkv, d = mod.num_heads, mod.num_kv_heads, mod.head_dim
    w = {n: t.to(F64) for n, t in mod.named_parameters()}
    q = oracle_rope((x @ w["q_proj.weight"].T).reshape(b, length, h, d), positions)
    k = oracle_rope((x @ w["k_proj.weight"].T).reshape(b, length, hkv, d), positions)
    v = (x @ w["v_proj.weight"].T).reshape(b, length, hkv, d)
    vis = visibility(b, h, length, length, bool_mask=bool_mask, causal=True)
    out = torch.zeros(b, length, h, d, dtype=F64)
    for bi in range(b):
        for i in range(h):
            g = i // (h // hkv)
            s = q[bi, :, i] @ k[bi, :, g].T / math.sqrt(d)
            s = torch.where(vis[bi, i], s, torch.full_like(s, -math.inf))
            live = vis[bi, i].any(dim=-1, keepdim=True)
            p = torch.where(live, torch.softmax(torch.where(live, s, torch.zeros_like(s)), dim=-1), 0.0)
            out[bi, :, i] = p @ v[bi, :, g]
    return out.reshape(b, length, e) @ w["out_proj.weight"].T


def oracle_logits(model, input_ids, attention_mask=None):
    """Logits ``(B, L, V)`` in float64 for a model without cache."""
    b, length = input_ids.shape
    if attention_mask is None:
        positions = torch.arange(length).expand(b, length)
        bool_mask = None
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        bool_mask = attention_mask.bool()[:, None, None, :]
    emb = model.embed_tokens.weight.to(F64)
    x = emb[input_ids]
    for block in model.layers:
        h = rms_norm(x, block.attn_norm.weight, block.attn_norm.eps)
        if type(block.attn).__name__ == "MultiheadDiffAttn":
            x = x + oracle_module(block.attn, h, positions=positions, bool_mask=bool_mask, causal=True)
        else:
            x = x + oracle_standard(block.attn, h, positions, bool_mask)
        h = rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
        f = block.ffn
        gate = h @ f.gate_proj.weight.to(F64).T
        x = x + (gate * torch.sigmoid(gate) * (h @ f.up_proj.weight.to(F64).T)) @ f.down_proj.weight.to(F64).T
    return rms_norm(x, model.norm.weight, model.norm.eps) @ emb.T
