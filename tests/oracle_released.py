"""Independent float64 statements of the released models' differential attention, for the tests only.

Written from the equations of issue 17 (GDA / Motif-2, Phi-4-mini-flash's SambaY block, timm's
DiffAttention), sharing no code with the package: loops over heads, index arithmetic written out,
RoPE through complex numbers (tests/oracle.py), masks as position comparisons.
"""

from __future__ import annotations

import math

import torch

from tests.oracle import F64, oracle_rope, softmax_visible


def _lam(p, lam_init):
    return torch.exp((p["lambda_q1"] * p["lambda_k1"]).sum()) - torch.exp((p["lambda_q2"] * p["lambda_k2"]).sum()) + lam_init


def _rms(o, weight, eps):
    return o / torch.sqrt((o * o).mean(dim=-1, keepdim=True) + eps) * weight


def _visible(lq, lk, causal, window=None):
    """Bool (Lq, Lk): query j (the last Lq of Lk positions) sees key t."""
    off = lk - lq
    vis = torch.ones(lq, lk, dtype=torch.bool)
    for j in range(lq):
        for t in range(lk):
            if causal and t > j + off:
                vis[j, t] = False
            if window is not None and t <= j + off - window:
                vis[j, t] = False
    return vis


def oracle_gda(params, x, *, num_heads, num_noise_heads, num_kv_heads, head_dim, lambda_init, eps=1e-5,
               positions=None, bool_mask=None, add_mask=None, causal=True):
    """GDA from a Motif-named state dict. bool_mask/add_mask broadcast to (B, N_n, L, L)."""
    p = {n: t.to(F64) for n, t in params.items()}
    x = x.to(F64)
    b, length, _ = x.shape
    h, n_n, hkv, d = num_heads, num_noise_heads, num_kv_heads, head_dim
    r = (h - n_n) // n_n
    n_s = h - n_n
    pairs = hkv // 2
    q = (x @ p["q_proj.weight"].T).reshape(b, length, h, d)
    k = (x @ p["k_proj.weight"].T).reshape(b, length, hkv, d)
    v = (x @ p["v_proj.weight"].T).reshape(b, length, hkv, d)
    if positions is not None:  # NeoX over d, before the split
        q, k = oracle_rope(q, positions, interleaved=False), oracle_rope(k, positions, interleaved=False)
    lam = _lam(p, lambda_init)
    vis = _visible(length, length, causal).expand(b, n_n, length, length)
    if bool_mask is not None:
        vis = vis & bool_mask.expand(b, n_n, length, length)
    add = None
    if add_mask is not None:
        add = add_mask.to(F64).expand(b, n_n, length, length)
        vis = vis & (add > -math.inf)
    outs = []
    for bi in range(b):
        heads = []
        for j in range(n_s):
            g = j // r
            sig_head = g * (r + 1) + j % r  # projection head of signal j
            noise_head = g * (r + 1) + r
            ps, pn = j * pairs // n_s, g * pairs // n_n
            maps = []
            for qh, kh, pr in ((sig_head, 2 * ps, ps), (noise_head, 2 * pn + 1, pn)):
                s = q[bi, :, qh] @ k[bi, :, kh].T / math.sqrt(d)
                if add is not None:
                    s = s + torch.where(vis[bi, g], add[bi, g], torch.zeros_like(s))
                a = softmax_visible(s, vis[bi, g])
                maps.append(a @ torch.cat((v[bi, :, 2 * pr], v[bi, :, 2 * pr + 1]), dim=-1))  # (L, 2d)
            o = maps[0] - lam * maps[1]
            heads.append(_rms(o, p["subln.weight"], eps) * (1 - lambda_init))
        outs.append(torch.cat(heads, dim=-1))  # (L, N_s*2d)
    return torch.stack(outs) @ p["o_proj.weight"].T


def _diff_heads(q, k, v, lam, vis, d):
    """q (L, 2H, d) maps 2i/2i+1; k (S, 2Hkv, d); v (S, Hkv, 2d); vis (L, S) -> (L, H, 2d)."""
    h, hkv = q.shape[1] // 2, k.shape[1] // 2
    heads = []
    for i in range(h):
        g = i // (h // hkv)
        a1 = softmax_visible(q[:, 2 * i] @ k[:, 2 * g].T / math.sqrt(d), vis)
        a2 = softmax_visible(q[:, 2 * i + 1] @ k[:, 2 * g + 1].T / math.sqrt(d), vis)
        heads.append((a1 - lam * a2) @ v[:, g])
    return torch.stack(heads, dim=1)


def oracle_phi4flash_layer(params, x, *, hidden, num_heads, num_kv_heads, layer_idx, window=None, shared_kv=None,
                           round_bf16=False):
    """One SambaY differential attention layer over the whole sequence x (B, L, hidden), float64.

    ``round_bf16`` rounds q, k, v and lambda to bfloat16 first (the shipped code's casts), computes
    in float64 and rounds the attention output to bfloat16.

    Returns (out, (k, v)) with k (B, L, Hkv, d) and v (B, L, Hkv, d) as projected (for YOCO sharing).
    A cross layer (``shared_kv`` given) projects only q and attends to those keys and values.
    """
    p = {n: t.to(F64) for n, t in params.items()}
    x = x.to(F64)
    b, length, _ = x.shape
    d = hidden // num_heads
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
    proj = x @ p["Wqkv.weight"].T + p["Wqkv.bias"]
    q = proj[..., :hidden].reshape(b, length, num_heads, d)
    if shared_kv is None:
        k = proj[..., hidden: hidden + num_kv_heads * d].reshape(b, length, num_kv_heads, d)
        v = proj[..., hidden + num_kv_heads * d:].reshape(b, length, num_kv_heads, d)
    else:
        k, v = shared_kv
    lam = _lam(p, lam_init)
    if round_bf16:
        q, k, v, lam = (t.to(torch.bfloat16).to(F64) for t in (q, k, v, lam))
    vis = _visible(length, k.shape[1], True, window)
    outs = []
    for bi in range(b):
        # even heads are map 1, odd heads map 2; the value of head i is [v_even | v_odd] of its group
        vv = torch.cat((v[bi, :, 0::2], v[bi, :, 1::2]), dim=-1)  # (S, Hkv/2, 2d)
        o = _diff_heads(q[bi], k[bi], vv, lam, vis, d)  # (L, H/2, 2d)
        if round_bf16:  # the attention output comes back in bfloat16 too
            o = o.to(torch.bfloat16).to(F64)
        o = _rms(o, p["subln.weight"], 1e-5) * (1 - lam_init)
        outs.append(o.reshape(length, hidden))
    return torch.stack(outs) @ p["out_proj.weight"].T + p["out_proj.bias"], (k, v)


def oracle_timm(params, x, *, dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, depth, dual_lambda,
                norm_eps=1e-6, attn_mask=None, is_causal=False):
    """timm's DiffAttention forward from its state dict, float64. attn_mask: bool (B|1, 1|H, N, N)."""
    p = {n: t.to(F64) for n, t in params.items()}
    x = x.to(F64)
    b, n, _ = x.shape
    h = num_heads
    d = dim // h // 2
    qkv = x @ p["qkv.weight"].T + (p["qkv.bias"] if qkv_bias else 0.0)
    q = qkv[..., :dim].reshape(b, n, 2 * h, d)
    k = qkv[..., dim: 2 * dim].reshape(b, n, 2 * h, d)
    v = qkv[..., 2 * dim:].reshape(b, n, h, 2 * d)
    if qk_norm:
        q, k = _rms(q, p["q_norm.weight"], norm_eps), _rms(k, p["k_norm.weight"], norm_eps)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
    lam = torch.exp(p["lambda_a"]) - torch.exp(p["lambda_b"]) + lam_init if dual_lambda else _lam(p, lam_init)
    outs = []
    for bi in range(b):
        vis = _visible(n, n, is_causal)
        if attn_mask is not None:
            vis = vis & attn_mask[bi if attn_mask.shape[0] > 1 else 0, 0]
        o = _diff_heads(q[bi], k[bi], v[bi], lam, vis, d)  # (N, H, 2d)
        o = _rms(o, p["sub_norm.weight"], 1e-5) * (1 - lam_init)
        outs.append(o.reshape(n, dim))
    y = torch.stack(outs)
    if scale_norm:
        y = _rms(y, p["norm.weight"], norm_eps)
    return y @ p["proj.weight"].T + (p["proj.bias"] if proj_bias else 0.0)
