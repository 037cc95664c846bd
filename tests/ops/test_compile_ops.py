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


def test_untraceable_strategy_refuses_inside_compile():
    q, k, v = _inputs()

    @torch.compile(fullgraph=True, backend="eager")
    def run(q, k, v):
        return diff_attention(q, k, v, 0.5, is_causal=True, impl="chunked")

    with pytest.raises(Exception, match="cannot be traced by torch.compile"):
        run(q, k, v)
