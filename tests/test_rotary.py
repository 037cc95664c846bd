import pytest
import torch

from multihead_sdpadiff import RotaryEmbedding, apply_rotary_emb
from tests.oracle import oracle_rope


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("d", [8, 24, 64])
def test_matches_complex_rotation(interleaved, d):
    x = torch.randn(2, 11, 3, d, dtype=torch.float64)
    cos, sin = RotaryEmbedding(d)(20, dtype=torch.float64)
    pos = torch.arange(11).expand(2, 11)
    got = apply_rotary_emb(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(got, oracle_rope(x, pos, interleaved=interleaved), rtol=1e-12, atol=1e-12)


def test_offsets_and_position_ids():
    x = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    cos, sin = RotaryEmbedding(16)(32, dtype=torch.float64)
    pos = torch.tensor([[3, 4, 5, 6, 7], [10, 11, 12, 13, 14]])
    want = oracle_rope(x, pos)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin, True, position_ids=pos), want)
    torch.testing.assert_close(apply_rotary_emb(x, cos, sin, True, seqlen_offsets=torch.tensor([3, 10])), want)
    torch.testing.assert_close(apply_rotary_emb(x[:1], cos, sin, True, seqlen_offsets=3), want[:1])


def test_partial_rotary_leaves_the_rest():
    x = torch.randn(1, 4, 2, 16)
    cos, sin = RotaryEmbedding(8)(4)
    out = apply_rotary_emb(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8], apply_rotary_emb(x[..., :8].contiguous(), cos, sin))


def test_tables_and_low_precision():
    cos, sin = RotaryEmbedding(8, base=100.0)(6, offset=2)
    angles = torch.arange(2, 8, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(0, 8, 2) / 8)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 6, 1, 8, dtype=torch.bfloat16)
    assert apply_rotary_emb(x, cos, sin, True).dtype == torch.bfloat16


def test_errors():
    x = torch.randn(1, 6, 1, 8)
    cos, sin = RotaryEmbedding(8)(4)
    with pytest.raises(ValueError, match="need 6"):
        apply_rotary_emb(x, cos, sin)
    with pytest.raises(ValueError, match="x must be"):
        apply_rotary_emb(x[0], cos, sin)
    with pytest.raises(ValueError, match="dim must be"):
        RotaryEmbedding(7)
    cos, sin = RotaryEmbedding(16)(8)
    with pytest.raises(ValueError, match="head_dim / 2 = 4"):
        apply_rotary_emb(x, cos, sin)
