import os

# Triton kernels run on CPU tensors under the interpreter, so that every test generated from the
# registry covers the "triton" strategy too. Set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib

import pytest
import torch

from multihead_sdpadiff import IMPLS
from multihead_sdpadiff.ops import _prepare, get_strategy

STRATEGIES = [name for name in IMPLS if name != "auto"]


def skip_unless_supported(impl, q, k, v, lam, attn_mask=None, is_causal=False):
    """Skip the test with the strategy's own reasons when it cannot run these inputs."""
    if impl == "auto":
        return
    reasons = get_strategy(impl).not_supported_reasons(_prepare(q, k, v, lam, attn_mask, is_causal, None))
    if reasons:
        pytest.skip(f"{impl}: {'; '.join(reasons)}")


@contextlib.contextmanager
def skip_if_refused():
    """Skip, with the strategy's own reasons, when the dispatcher refuses to run a module's inputs."""
    try:
        yield
    except ValueError as exc:
        if "cannot run these inputs" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def precision_for(registry, impl):
    """``(dtype, output tolerance, gradient tolerance)`` at which to test ``impl`` of ``registry``
    against a float64 statement: float64 to 1e-10, or float32 to float32's rounding for a strategy
    that refuses float64 (``cpu_fused``; its inputs are rounded to float32 first, and the
    statement is evaluated in float64 from those same inputs)."""
    if impl == "auto" or torch.float64 in registry.get(impl).dtypes:
        return torch.float64, dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-9, atol=1e-9)
    return torch.float32, dict(rtol=2e-5, atol=2e-5), dict(rtol=1e-4, atol=5e-5)


def leaves_as(dtype, *tensors):
    """Each tensor as a new leaf of ``dtype`` that requires grad (``None`` stays ``None``)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
