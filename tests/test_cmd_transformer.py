"""methods/nets/transformer.py: positions, divided space-time attention, DiT with adaLN-Zero."""

from __future__ import annotations

import pytest
import torch

from methods.nets.transformer import (
    DIT_SIZES,
    DiT,
    DiTBlock,
    DiTConfig,
    DiTFinalLayer,
    SpaceTimeBlock,
    SpaceTimeTransformer,
    sincos_1d,
    sincos_2d,
)


@pytest.mark.parametrize("h,w,dim", [(4, 4, 16), (3, 5, 10), (1, 7, 9)])
def test_sincos_2d_distinct_positions(h, w, dim):
    pos = sincos_2d(h, w, dim)
    assert pos.shape == (h * w, dim)
    assert torch.cdist(pos, pos).add(torch.eye(h * w) * 1e3).min() > 1e-3  # every grid cell has its own code


def test_sincos_1d_golden():
    pos = sincos_1d(3, 4)
    # position p: [sin(p), sin(p / 100), cos(p), cos(p / 100)]
    p = torch.arange(3.0)[:, None]
    expected = torch.cat([torch.sin(p), torch.sin(p / 100), torch.cos(p), torch.cos(p / 100)], dim=1)
    assert torch.allclose(pos, expected, atol=1e-6)


def test_space_time_block_factorisation():
    """One block: a token sees its own frame (space) and its own location in other frames (time)."""
    torch.manual_seed(0)
    block = SpaceTimeBlock(16, heads=2).eval()
    x = torch.randn(1, 4, 6, 16)  # (B, T, N, D)
    y = block(x)
    x2 = x.clone()
    x2[0, 0, 0] += torch.randn(16)  # perturb frame 0, location 0
    d = (block(x2) - y).abs().sum(-1)[0]  # (T, N)
    assert d[2, 0] > 1e-4  # same location, another frame: through time attention
    assert d[0, 3] > 1e-4  # same frame, another location: through space attention
    assert d[2, 3] > 1e-4  # another frame and location: time then space within one block


def test_space_time_transformer_grid_check_and_shape():
    net = SpaceTimeTransformer(16, depth=2, heads=4)
    x = torch.randn(2, 3, 12, 16)
    assert net(x, (3, 4)).shape == x.shape
    assert net(torch.randn(1, 5, 20, 16), (4, 5)).shape == (1, 5, 20, 16)  # any grid
    with pytest.raises(ValueError, match="grid"):
        net(x, (4, 4))


def test_dit_block_starts_as_identity_and_uses_c():
    torch.manual_seed(0)
    block = DiTBlock(16, heads=2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(block(x, c), x)  # adaLN-Zero
    torch.nn.init.normal_(block.ada[-1].weight, std=0.1)
    assert (block(x, c) - block(x, c + 1)).abs().max() > 1e-4  # c modulates the block


def test_dit_final_layer_zero_and_shape():
    layer = DiTFinalLayer(16, 12)
    out = layer(torch.randn(2, 5, 16), torch.randn(2, 16))
    assert out.shape == (2, 5, 12) and out.abs().max() == 0


def test_dit_sizes_and_trunk():
    assert (DIT_SIZES["L"].width, DIT_SIZES["L"].depth, DIT_SIZES["L"].heads) == (1024, 24, 16)
    dit = DiT(DiTConfig(width=16, depth=2, heads=2))
    x = torch.randn(3, 7, 16)
    assert dit(x, torch.randn(3, 16)).shape == x.shape


def test_attention_cpu_path_matches_fused_kernel():
    from methods.nets.transformer import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=4)
    x = torch.randn(2, 9, 16)
    from einops import rearrange

    q, k, v = rearrange(attn.qkv(x), "b l (three h d) -> three b h l d", three=3, h=4)
    ref = attn.proj(rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
    assert torch.allclose(attn(x), ref, atol=1e-5)
