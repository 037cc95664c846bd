"""Under torch.compile, "auto" skips strategies that cannot be traced, and they refuse with a reason."""

import pytest
import torch

from multihead_sdpadiff import choose_impl, diff_attention


def _inputs():
    return torch.randn(1, 4, 33, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 1, 33, 32)


def test_auto_compiles_fullgraph_on_a_traceable_strategy():
    q, k, v = _inputs()
    assert choose_impl(q, k, v, 0.5, is_causal=True)[0] == "cpu_fused"  # eager CPU prefill

    @torch.compile(fullgraph=True, backend="eager")
    def run(q, k, v):
        return diff_attention(q, k, v, 0.5, is_causal=True)

    want = diff_attention(q, k, v, 0.5, is_causal=True, impl="reference")
    torch.testing.assert_close(run(q, k, v), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "cpu_fused", "triton"])
def test_op_strategies_compile_fullgraph_forward_and_backward(impl):
    """chunked, cpu_fused and triton are torch ops: one graph node each, gradients through
    register_autograd (triton runs under TRITON_INTERPRET=1 here, see tests/conftest.py)."""
    q, k, v = (t.requires_grad_() for t in _inputs())
    lam = torch.tensor(0.5, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def run(q, k, v, lam):
        return diff_attention(q, k, v, lam, is_causal=True, impl=impl)

    out = run(q, k, v, lam)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, lam), g)
    want_out = diff_attention(q, k, v, lam, is_causal=True, impl="reference")
    want = torch.autograd.grad(want_out, (q, k, v, lam), g)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_untraceable_strategy_refuses_inside_compile():
    from multihead_sdpadiff import grouped_diff_attention
    from multihead_sdpadiff.ops.grouped import REGISTRY_GROUPED

    assert not REGISTRY_GROUPED.get("chunked").compilable  # its block loop is Python, not an op
    qs, qn = torch.randn(1, 4, 9, 8), torch.randn(1, 1, 9, 8)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 1, 9, 16)

    @torch.compile(fullgraph=True, backend="eager")
    def run(qs, qn, k, v):
        return grouped_diff_attention(qs, qn, k, v, 0.5, is_causal=True, impl="chunked")

    with pytest.raises(Exception, match="cannot be traced by torch.compile"):
        run(qs, qn, k, v)


def test_chunked_op_opcheck():
    from multihead_sdpadiff.ops import _prepare

    q, k, v = torch.randn(1, 4, 9, 8, dtype=torch.float64), torch.randn(1, 2, 12, 8, dtype=torch.float64), \
        torch.randn(1, 1, 12, 16, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pad = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    pad[..., :3] = False
    i = _prepare(q, k, v, torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True), pad, True, None)
    torch.library.opcheck(torch.ops.sdpadiff.chunked_fwd.default,
                          (i.q, i.k, i.v, i.lam, i.mask.tensor, True, [-1, -1], [], [], i.scale, 4))
