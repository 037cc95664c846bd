"""An independent float64 statement of differential attention, written for the tests only.

It shares no code with the package: explicit loops over batch and head, the GQA pairing written
out as index arithmetic, the causal rule as a comparison of positions, RoPE through complex
numbers. Everything runs in float64 and stays differentiable, so gradients can be compared too.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def visibility(b, h, lq, lk, *, bool_mask=None, causal=False, window=None, seqlens=None):
    """Bool (B, H, Lq, Lk): True where query j may see key t.

    ``window`` (left, right), -1 unbounded: the last query stands at the last key, so query j is at
    position j + Lk - Lq and sees keys no more than ``left`` before and ``right`` after it.
    ``seqlens`` ((lengths of q), (lengths of k)): the row holds packed documents one after the
    other; a query sees only keys of its own document, and causal and window hold inside it.
    """
    vis = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if bool_mask is not None:
        vis = vis & bool_mask.expand(b, h, lq, lk)
    lens_q, lens_k = seqlens if seqlens is not None else ([lq], [lk])
    assert sum(lens_q) == lq and sum(lens_k) == lk
    doc_q = [s for s, n in enumerate(lens_q) for _ in range(n)]
    doc_k = [s for s, n in enumerate(lens_k) for _ in range(n)]
    left, right = window if window is not None else (-1, -1)

    def sees(j, t):
        s = doc_q[j]
        if doc_k[t] != s:
            return False
        pos = j - sum(lens_q[:s]) + lens_k[s] - lens_q[s]  # the query's position in its document
        tt = t - sum(lens_k[:s])
        return not ((causal and tt > pos) or (left != -1 and tt < pos - left) or (right != -1 and tt > pos + right))

    rule = torch.tensor([[sees(j, t) for t in range(lk)] for j in range(lq)], dtype=torch.bool).reshape(lq, lk)
    vis = vis & rule
    return vis


def softmax_visible(s, vis):
    """Softmax of scores s (Lq, Lk) over the keys where vis; exactly 0 elsewhere and on empty rows."""
    s = torch.where(vis, s, torch.full_like(s, max(-1e300, torch.finfo(s.dtype).min)))
    e = torch.where(vis, torch.exp(s - s.max(dim=-1, keepdim=True).values), torch.zeros_like(s))
    z = e.sum(dim=-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def oracle_attention(q, k, v, lam, *, bool_mask=None, add_mask=None, causal=False, scale=None, window=None,
                     seqlens=None):
    """q (B, 2H, Lq, d), k (B, 2Hkv, Lk, d), v (B, Hkv, Lk, 2d), lam float or (H,) -> (B, H, Lq, 2d)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    b, h2, lq, d = q.shape
    h, hkv, lk = h2 // 2, k.shape[1] // 2, k.shape[2]
    group_size = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lam = torch.as_tensor(lam, dtype=F64).expand(h)
    vis = visibility(b, h, lq, lk, bool_mask=bool_mask, causal=causal, window=window, seqlens=seqlens)
    if add_mask is not None:
        add = add_mask.to(F64).expand(b, h, lq, lk)
        vis = vis & (add > -math.inf)
    rows = []
    for bi in range(b):
        heads = []
        for i in range(h):
            g = i // group_size
            maps = []
            for c in (0, 1):
                s = q[bi, 2 * i + c] @ k[bi, 2 * g + c].T * scale  # (Lq, Lk)
                if add_mask is not None:
                    s = s + torch.where(vis[bi, i], add[bi, i], torch.zeros_like(s))
                maps.append(softmax_visible(s, vis[bi, i]))
            heads.append((maps[0] - lam[i] * maps[1]) @ v[bi, g])
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def oracle_rope(x, positions, base=10000.0, interleaved=True):
    """x (B, L, heads, d) rotated at integer positions (B, L) with complex numbers, float64."""
    x = x.to(F64)
    d = x.shape[-1]
    freqs = torch.tensor([base ** (-2.0 * j / d) for j in range(d // 2)], dtype=F64)
    rot = torch.polar(torch.ones_like(freqs), positions.to(F64)[..., None] * freqs)  # (B, L, d/2)
    if interleaved:
        pairs = torch.complex(x[..., 0::2], x[..., 1::2])
        out = pairs * rot[:, :, None]
        return torch.stack((out.real, out.imag), dim=-1).flatten(-2)
    pairs = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    out = pairs * rot[:, :, None]
    return torch.cat((out.real, out.imag), dim=-1)


def oracle_module(mod, x, *, positions=None, bool_mask=None, add_mask=None, causal=True, base=10000.0):
    """MultiheadDiffAttn's forward from its parameters, in float64, by the paper's equations."""
    p = {n: t.to(F64) for n, t in mod.named_parameters()}
    x = x.to(F64)
    b, length, e = x.shape
    h, hkv, d = mod.num_heads, mod.num_kv_heads, mod.head_dim
    q = (x @ p["q_proj.weight"].T).reshape(b, length, 2 * h, d)
    k = (x @ p["k_proj.weight"].T).reshape(b, length, 2 * hkv, d)
    v = (x @ p["v_proj.weight"].T).reshape(b, length, hkv, 2 * d)
    if positions is not None:
        q, k = oracle_rope(q, positions, base), oracle_rope(k, positions, base)
    depth_init = mod.lambda_init
    lam = (torch.exp((p["lambda_q1"] * p["lambda_k1"]).sum()) - torch.exp((p["lambda_q2"] * p["lambda_k2"]).sum())
           + depth_init)
    o = oracle_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam,
                         bool_mask=bool_mask, add_mask=add_mask, causal=causal)  # (B, H, L, 2d)
    rms = torch.sqrt((o * o).mean(dim=-1, keepdim=True) + mod.subln.eps)
    o = o / rms * p["subln.weight"] * (1 - depth_init)
    return o.transpose(1, 2).reshape(b, length, e) @ p["out_proj.weight"].T


def naive_low_precision(q, k, v, lam, *, bool_mask=None, causal=False):
    """The equation computed plainly in the inputs' low dtype, without upcasting (error yardstick)."""
    b, h2, lq, d = q.shape
    h, hkv, lk = h2 // 2, k.shape[1] // 2, k.shape[2]
    kr = k.unflatten(1, (hkv, 2)).repeat_interleave(h // hkv, dim=1)
    s = q.unflatten(1, (h, 2)) @ kr.transpose(-1, -2) * d**-0.5  # (B, H, 2, Lq, Lk)
    vis = visibility(b, h, lq, lk, bool_mask=bool_mask, causal=causal).unsqueeze(2)
    s = s.masked_fill(~vis, float("-inf"))
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)
    lam_t = torch.as_tensor(lam).to(q.dtype).expand(h).view(1, h, 1, 1)
    return (a[:, :, 0] - lam_t * a[:, :, 1]) @ v.repeat_interleave(h // hkv, dim=1)


# Differential attention V2 (unilm Diff-Transformer-V2): 2H query maps, Hkv kv heads of width d.


def oracle_attention_v2(q, k, v, lam, *, bool_mask=None, add_mask=None, causal=False, scale=None, dtype=F64,
                        window=None, seqlens=None):
    """q (B, 2H, Lq, d), k and v (B, Hkv, Lk, d), lam float, (H,) or (B, H, Lq) -> (B, H, Lq, d).

    Each map is plain attention on its own; map m reads kv head m // (2H / Hkv) (the GQA rule of
    the kernel the authors call). Head i is then out[2i] - lam_i * out[2i+1], row by row. The
    whole computation runs in ``dtype``: float64 for the oracle, a low dtype for a plain run.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    b, n_maps, lq, d = q.shape
    h, hkv, lk = n_maps // 2, k.shape[1], k.shape[2]
    maps_per_kv = n_maps // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lam = torch.as_tensor(lam).to(dtype)
    if lam.dim() == 1:
        lam = lam[None, :, None]
    lam = lam.expand(b, h, lq)
    vis = visibility(b, h, lq, lk, bool_mask=bool_mask, causal=causal, window=window, seqlens=seqlens)
    if add_mask is not None:
        add = add_mask.to(dtype).expand(b, h, lq, lk)
        vis = vis & (add > -math.inf)
    rows = []
    for bi in range(b):
        heads = []
        for i in range(h):
            per_map = []
            for m in (2 * i, 2 * i + 1):
                g = m // maps_per_kv
                s = q[bi, m] @ k[bi, g].T * scale  # (Lq, Lk)
                if add_mask is not None:
                    s = s + torch.where(vis[bi, i], add[bi, i], torch.zeros_like(s))
                per_map.append(softmax_visible(s, vis[bi, i]) @ v[bi, g])  # (Lq, d)
            heads.append(per_map[0] - lam[bi, i][:, None] * per_map[1])
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def oracle_module_v2(params, x, *, num_heads, num_kv_heads, head_dim, positions=None, bool_mask=None,
                     add_mask=None, causal=True, base=10000.0, dtype=F64):
    """The V2 layer's forward from a state dict with the authors' keys, by their equations.

    q_proj (2H*d, E), k_proj and v_proj (Hkv*d, E), o_proj (E, H*d), lambda_proj (H, E); RoPE
    interleaved on the q maps and k heads at ``positions`` (B, L); lam = sigmoid(lambda_proj(x)).
    """
    p = {n: t.to(dtype) for n, t in params.items()}
    x = x.to(dtype)
    b, length, _ = x.shape
    h, hkv, d = num_heads, num_kv_heads, head_dim
    q = (x @ p["q_proj.weight"].T).reshape(b, length, 2 * h, d)
    k = (x @ p["k_proj.weight"].T).reshape(b, length, hkv, d)
    v = (x @ p["v_proj.weight"].T).reshape(b, length, hkv, d)
    if positions is not None:
        q, k = oracle_rope(q, positions, base).to(dtype), oracle_rope(k, positions, base).to(dtype)
    lam = torch.sigmoid(x @ p["lambda_proj.weight"].T).permute(0, 2, 1)  # (B, H, L)
    o = oracle_attention_v2(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lam,
                            bool_mask=bool_mask, add_mask=add_mask, causal=causal, dtype=dtype)  # (B, H, L, d)
    return o.transpose(1, 2).reshape(b, length, h * d) @ p["o_proj.weight"].T
