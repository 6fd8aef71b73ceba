"""The lean UNet's temporal attention option (`unet.temporal_attention`): identity at init, full temporal reach."""

from __future__ import annotations

import pytest
import torch

from benchmarks.config import config_hash, load_config
from benchmarks.preflight import ConfigError, validate_config
from methods.nets.unet import TemporalAttention, UNet, UNetConfig


def _unet(levels: list[int]) -> UNet:
    torch.manual_seed(0)
    return UNet(3, 3, UNetConfig(channels=[8, 16], heads=2, attention=False, temporal_attention=levels), temporal=True)


def _randomise(net: UNet) -> UNet:
    """Every weight drawn at random (the zero-initialised output layers too), so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return net


def test_temporal_attention_starts_as_identity():
    plain, extra = _unet([]), _unet([0, 1])
    missing, unexpected = extra.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".time_attn." in k for k in missing)
    x, t = torch.randn(2, 3, 6, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(extra(x, t), plain(x, t))
    # the new blocks train: their output projection gets a gradient (once the zero-initialised output layer has moved)
    torch.nn.init.normal_(extra.out[-1].weight, std=0.1)
    extra(x, t).square().mean().backward()
    grads = [m.attn.out_proj.weight.grad for m in extra.modules() if isinstance(m, TemporalAttention)]
    assert len(grads) == 2 * 3 and all(g is not None and g.abs().sum() > 0 for g in grads)  # 1 down + 2 up per level


@pytest.mark.parametrize("levels, reaches", [([], False), ([0], True)])
def test_temporal_attention_reaches_every_frame(levels, reaches):
    # two levels of kernel-3 temporal convs see +-7 frames at most (7 residual blocks); 16 frames apart needs attention
    net = _randomise(_unet(levels))
    x = torch.randn(1, 3, 16, 4, 4, requires_grad=True)
    net(x, torch.tensor([300]))[:, :, 0].sum().backward()
    far = x.grad[:, :, 15].abs().max().item()
    near = x.grad[:, :, 1].abs().max().item()
    assert near > 0
    assert (far > 1e-6 * near) is reaches


def test_temporal_attention_config_is_checked_and_hashed():
    base = load_config(["method=vdm", "scale=test"])
    with_attn = load_config(["method=vdm", "scale=test", "method.unet.temporal_attention=[0]"])
    assert config_hash(with_attn) != config_hash(base)
    validate_config(with_attn)
    with pytest.raises(ConfigError, match="method.unet.temporal_attention"):
        validate_config(load_config(["method=vdm", "scale=test", "method.unet.temporal_attention=[2]"]))
    with pytest.raises(ValueError, match="built for images"):
        UNet(3, 3, UNetConfig(channels=[8, 16], temporal_attention=[0]), temporal=False)
