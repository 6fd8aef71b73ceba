"""The block-matching codec (methods/codec.py): exact inversion, known motions, energy compaction."""

import itertools

import pytest
import torch

from datamodules.shapes import ShapesConfig, ShapesDataset
from methods import codec


def _shapes(n: int, frames: int, res: int) -> torch.Tensor:
    ds = ShapesDataset(ShapesConfig(frames=frames, resolution=res), "train")
    return torch.stack([ds[i]["video"] for i in range(n)])  # (n, 3, T, res, res)


def _translating(shift: tuple[int, int], frames: int = 5, size: int = 16, batch: int = 2) -> torch.Tensor:
    """A textured frame whose content moves by `shift` (dy, dx) pixels per frame: crops of one large texture."""
    g = torch.Generator().manual_seed(0)
    big = torch.rand(batch, 3, size + 2 * 16, size + 2 * 16, generator=g) * 2 - 1
    dy, dx = shift
    crops = [big[:, :, 16 - i * dy:16 - i * dy + size, 16 - i * dx:16 - i * dx + size] for i in range(frames)]
    return torch.stack(crops, dim=2)  # (B, 3, T, size, size)


@pytest.mark.parametrize("block,search", [(4, 4), (2, 1), (8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruction_is_bit_exact(block, search, dtype):
    g = torch.Generator().manual_seed(1)
    # full-mantissa values at magnitudes 2^-20 .. 1: float32 arithmetic would not invert them exactly
    sign = torch.sign(torch.rand(2, 3, 6, 16, 16, generator=g) - 0.5)
    noise = (sign * torch.rand(2, 3, 6, 16, 16, generator=g).pow(4).clamp(min=2**-20)).to(dtype)
    for video in (noise, _shapes(3, 6, 16).to(dtype)):
        mv, r = codec.decompose(video, block, search)
        assert mv.shape == (video.shape[0], 2, 5, 16 // block, 16 // block) and mv.dtype == torch.long
        assert r.shape == (video.shape[0], 3, 5, 16, 16)
        assert mv.abs().max() <= search
        out = codec.reconstruct(video[:, :, 0], mv, r, block)
        assert out.dtype == dtype and torch.equal(out, video)


@pytest.mark.parametrize("shift", [(1, -2), (0, 3), (-3, 0), (2, 2)])
def test_a_translation_gives_its_motion_vector_and_zero_residuals_inside(shift):
    video = _translating(shift)
    mv, r = codec.decompose(video, block=4, search=3)
    inner = mv[..., 1:-1, 1:-1]  # blocks whose source stays inside the frame: (B, 2, T-1, 2, 2)
    assert torch.equal(inner, torch.tensor(shift).view(1, 2, 1, 1, 1).expand_as(inner))
    assert r[..., 4:-4, 4:-4].abs().max() == 0  # the interior blocks are predicted exactly
    assert r.abs().max() > 0  # content entering at the border is not


def test_flat_frames_keep_zero_motion():
    video = torch.full((1, 3, 3, 8, 8), 0.25)
    mv, r = codec.decompose(video, block=4, search=2)
    assert mv.abs().max() == 0 and r.abs().max() == 0


def test_matching_picks_the_minimum_absolute_error_candidate():
    g = torch.Generator().manual_seed(2)
    cur, prev = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    block, search = 4, 2
    mv = codec.match_blocks(cur, prev, block, search)  # (2, 2, 2, 2)

    def sad(n, by, bx, dy, dx):
        one = torch.tensor([[[dy]], [[dx]]]).expand(2, 2, 2).clone()
        pred = codec.warp(prev[n], one, block)
        sl = (slice(None), slice(by * block, (by + 1) * block), slice(bx * block, (bx + 1) * block))
        return (cur[n][sl] - pred[sl]).abs().sum()

    for n, by, bx in itertools.product(range(2), range(2), range(2)):
        chosen = sad(n, by, bx, *mv[n, :, by, bx].tolist())
        best = min(sad(n, by, bx, dy, dx) for dy, dx in codec.candidates(search))
        assert chosen == pytest.approx(best.item(), abs=1e-5)


def test_warp_matches_a_per_pixel_reference():
    g = torch.Generator().manual_seed(3)
    prev = torch.rand(2, 3, 8, 8, generator=g)
    mv = torch.randint(-3, 4, (2, 2, 4, 4), generator=g)
    out = codec.warp(prev, mv, block=2)
    ref = torch.empty_like(prev)
    for n, y, x in itertools.product(range(2), range(8), range(8)):
        dy, dx = mv[n, :, y // 2, x // 2].tolist()
        ref[n, :, y, x] = prev[n, :, min(max(y - dy, 0), 7), min(max(x - dx, 0), 7)]
    assert torch.equal(out, ref)


def test_codec_residuals_carry_far_less_energy_than_frame_differences():
    video = _shapes(16, 16, 32)
    mv, r = codec.decompose(video, block=4, search=4)
    codec_energy = r.pow(2).sum()
    to_first = (video[:, :, 1:] - video[:, :, :1]).pow(2).sum()  # D-VDM's target
    to_previous = (video[:, :, 1:] - video[:, :, :-1]).pow(2).sum()  # zero-motion prediction
    assert codec_energy < 0.05 * to_first  # measured 0.011
    assert codec_energy < 0.2 * to_previous  # measured 0.06


def test_clamped_reconstruction_stays_in_range():
    first = torch.zeros(1, 3, 8, 8)
    mv = torch.zeros(1, 2, 3, 2, 2, dtype=torch.long)
    r = torch.full((1, 3, 3, 8, 8), 0.7)
    out = codec.reconstruct(first, mv, r, block=4, clamp=1.0)
    assert out.max() == 1 and torch.allclose(out[:, :, 1], torch.full_like(first, 0.7))


def test_sizes_that_do_not_fit_the_blocks_are_rejected():
    with pytest.raises(ValueError, match="divisible by the block size"):
        codec.decompose(torch.zeros(1, 3, 2, 10, 10), block=4, search=1)
    with pytest.raises(ValueError, match="do not fit"):
        codec.warp(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4, dtype=torch.long), block=4)


@pytest.mark.parametrize("match", ["original", "decoded"])
def test_closed_loop_with_a_lossless_coder_is_the_open_loop_bit_for_bit(match):
    video = _shapes(3, 6, 16)
    mv, r = codec.decompose(video, 4, 2)
    mv_c, r_c, rec = codec.decompose_closed_loop(video, 4, 2, lambda x: x, clamp=None, match=match)
    assert torch.equal(mv_c, mv) and torch.equal(r_c, r)  # x^ = x exactly, so the same vectors and residuals
    assert torch.equal(rec.float(), video) and torch.equal(codec.reconstruct(video[:, :, 0], mv_c, r_c, 4), video)


def test_closed_loop_frames_carry_only_their_own_coding_error():
    """x^_i - x_i = code(R_i) - R_i exactly (no clamping), whatever the earlier errors; the open loop sums them."""
    video = 0.5 * _shapes(4, 8, 16)
    g = torch.Generator().manual_seed(0)
    errs = []

    def code(r):
        e = 0.03 * torch.randn(r.shape, generator=g, dtype=r.dtype)
        errs.append(e)
        return r + e

    mv, r, rec = codec.decompose_closed_loop(video, 4, 2, code, clamp=None)
    torch.testing.assert_close(rec[:, :, 1:] - video[:, :, 1:].double(), torch.stack(errs, dim=2))
    # the decoder rebuilds exactly those frames from the coded residuals
    torch.testing.assert_close(codec.reconstruct(video[:, :, 0], mv, r + torch.stack(errs, dim=2), 4,
                                                 dtype=torch.float64), rec)
    # the open loop with the same errors: frame i carries all earlier ones (mean error grows)
    mv_o, r_o = codec.decompose(video, 4, 2)
    open_rec = codec.reconstruct(video[:, :, 0], mv_o, r_o + torch.stack(errs, dim=2), 4, dtype=torch.float64)
    open_err = (open_rec - video.double()).abs().mean(dim=(0, 1, 3, 4))
    closed_err = (rec - video.double()).abs().mean(dim=(0, 1, 3, 4))
    assert open_err[-1] > 2 * closed_err[-1] and closed_err[1:].std() < 0.1 * closed_err[1:].mean()


def test_closed_loop_matching_against_the_decoded_frame_uses_it():
    video = _shapes(2, 4, 16)

    def code(r):  # a coder that ruins the decoded frames: they are no longer the original ones
        return -r

    mv_o, _, _ = codec.decompose_closed_loop(video, 4, 2, code, match="original")
    mv_d, _, rec = codec.decompose_closed_loop(video, 4, 2, code, match="decoded")
    assert torch.equal(mv_o, codec.motion_vectors(video, 4, 2))
    assert torch.equal(mv_d[:, :, 0], mv_o[:, :, 0])  # the first P-frame's reference is the exact I-frame
    expect = codec.match_blocks(video[:, :, 2], rec[:, :, 1], 4, 2)
    assert torch.equal(mv_d[:, :, 1], expect)
    with pytest.raises(ValueError, match="match"):
        codec.decompose_closed_loop(video, 4, 2, code, match="future")
