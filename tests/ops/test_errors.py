"""Bad input to the op gets a ValueError (TypeError for a wrong type) naming the argument."""

import pytest
import torch

from multihead_sdpadiff import IMPLS, diff_attention


def good():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 1, 6, 16)


BAD = [
    ("q odd maps", lambda q, k, v: (q[:, :3], k, v, 0.5, {}), ValueError, "q must be"),
    ("k odd maps", lambda q, k, v: (q, torch.randn(2, 3, 6, 8), v, 0.5, {}), ValueError, "k must be"),
    ("heads not a multiple", lambda q, k, v: (torch.randn(2, 6, 5, 8), torch.randn(2, 4, 6, 8),
                                              torch.randn(2, 2, 6, 16), 0.5, {}), ValueError, "multiple"),
    ("head dims differ", lambda q, k, v: (q, torch.randn(2, 2, 6, 4), v, 0.5, {}), ValueError, "k must be"),
    ("v width", lambda q, k, v: (q, k, torch.randn(2, 1, 6, 8), 0.5, {}), ValueError, "v must be"),
    ("v heads", lambda q, k, v: (q, k, torch.randn(2, 2, 6, 16), 0.5, {}), ValueError, "v must be"),
    ("q not 4-D", lambda q, k, v: (q[0], k, v, 0.5, {}), ValueError, "q must be 4-D"),
    ("q not tensor", lambda q, k, v: (q.tolist(), k, v, 0.5, {}), TypeError, "q must be a torch.Tensor"),
    ("integer q", lambda q, k, v: (q.long(), k, v, 0.5, {}), ValueError, "q must be float"),
    ("dtype mismatch", lambda q, k, v: (q, k.double(), v, 0.5, {}), ValueError, "one dtype"),
    ("lambda shape", lambda q, k, v: (q, k, v, torch.ones(3), {}), ValueError, "lambda_full"),
    ("lambda type", lambda q, k, v: (q, k, v, "0.5", {}), TypeError, "lambda_full"),
    ("mask int dtype", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(5, 6, dtype=torch.long)}),
     ValueError, "attn_mask must be bool"),
    ("mask shape", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(5, 7, dtype=torch.bool)}),
     ValueError, "key length 6"),
    ("mask heads", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": torch.ones(2, 3, 5, 6, dtype=torch.bool)}),
     ValueError, "does not broadcast"),
    ("mask type", lambda q, k, v: (q, k, v, 0.5, {"attn_mask": [[True]]}), TypeError, "attn_mask must be"),
    ("is_causal type", lambda q, k, v: (q, k, v, 0.5, {"is_causal": 1}), TypeError, "is_causal"),
    ("scale", lambda q, k, v: (q, k, v, 0.5, {"scale": -1.0}), ValueError, "scale"),
    ("impl", lambda q, k, v: (q, k, v, 0.5, {"impl": "flash9"}), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, make, exc, match):
    q, k, v, lam, kw = make(*good())
    with pytest.raises(exc, match=match):
        diff_attention(q, k, v, lam, **kw)


def test_unknown_impl_lists_impls():
    with pytest.raises(ValueError) as info:
        diff_attention(*good(), 0.5, impl="nope")
    for name in IMPLS:
        assert name in str(info.value)
