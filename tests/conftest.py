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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
