import pytest
import torch

from mpp.masking import block_mask, grid_mask, make_noise, num_kept, patchify, random_masking, unpatchify


@pytest.mark.parametrize("chans,h,w,p", [(1, 28, 28, 4), (3, 32, 48, 8), (5, 16, 8, 4)])
def test_patchify_round_trip_any_channels_and_nonsquare(chans, h, w, p):
    imgs = torch.randn(2, chans, h, w)
    patches = patchify(imgs, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * chans)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), chans), imgs)


def test_patchify_layout_row_major_channels_last():
    imgs = torch.arange(2 * 4 * 6).float().reshape(1, 2, 4, 6)  # C=2, H=4, W=6, p=2 -> grid 2x3
    patches = patchify(imgs, 2)
    # Patch 1 is row 0, column 1: pixels rows 0-1, columns 2-3; inside it (py, px, c) with c fastest.
    expected = torch.stack([imgs[0, :, py, 2 + px] for py in range(2) for px in range(2)]).flatten()
    assert torch.equal(patches[0, 1], expected)


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 30, 28), 4)


@pytest.mark.parametrize("length,ratio", [(49, 0.75), (196, 0.75), (64, 0.5), (10, 0.9), (7, 0.0)])
def test_random_masking_keeps_exact_count(length, ratio):
    x = torch.randn(3, length, 8)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (3, keep, 8)
    assert torch.all(mask.sum(1) == length - keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_random_masking_reproducible_with_noise_and_restore_inverts():
    x = torch.randn(4, 49, 6)
    noise = torch.rand(4, 49)
    a = random_masking(x, 0.75, noise)
    b = random_masking(x, 0.75, noise.clone())
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    kept, mask, ids_restore = a
    # Kept tokens are the unmasked ones, in order of increasing noise.
    ids_shuffle = torch.argsort(noise, 1)
    assert torch.equal(kept, torch.gather(x, 1, ids_shuffle[:, :12, None].expand(-1, -1, 6)))
    # Putting the shuffled sequence through ids_restore gives back grid order.
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 6))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 6)), x)
    # The mask marks exactly the positions whose token was not kept.
    kept_positions = torch.zeros(4, 49)
    kept_positions.scatter_(1, ids_shuffle[:, :12], 1.0)
    assert torch.equal(mask, 1 - kept_positions)


def test_num_kept_rejects_bad_ratio():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            num_kept(10, bad)


@pytest.mark.parametrize("fn", [block_mask, grid_mask])
@pytest.mark.parametrize("grid,ratio", [((7, 7), 0.75), ((14, 14), 0.75), ((8, 6), 0.5), ((14, 14), 0.4)])
def test_structured_masks_remove_exact_count(fn, grid, ratio):
    gen = torch.Generator().manual_seed(0)
    masks = fn(5, grid, ratio, generator=gen)
    length = grid[0] * grid[1]
    assert masks.shape == (5, length) and masks.dtype == torch.bool
    assert torch.all(masks.sum(1) == length - num_kept(length, ratio))


def test_grid_mask_is_regular_on_even_grid():
    mask = grid_mask(1, (8, 8), 0.75, generator=torch.Generator().manual_seed(1)).reshape(8, 8)
    kept = (~mask).nonzero()
    # One kept patch per 2x2 cell, all at the same offset.
    assert len(kept) == 16
    assert len({(int(r) % 2, int(c) % 2) for r, c in kept}) == 1


def test_block_mask_is_blocky():
    # Removed patches of a block mask touch other removed patches far more often than under random masking.
    gen = torch.Generator().manual_seed(0)

    def neighbours(m):
        m = m.reshape(-1, 14, 14).float()
        return ((m[:, 1:, :] * m[:, :-1, :]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item()

    blocky = neighbours(block_mask(8, (14, 14), 0.4, generator=gen))
    rand = torch.zeros(8, 196, dtype=torch.bool)
    for i in range(8):
        rand[i, torch.randperm(196, generator=gen)[: 196 - num_kept(196, 0.4)]] = True
    assert blocky > 1.3 * neighbours(rand)


def test_make_noise_realises_the_mask():
    gen = torch.Generator().manual_seed(3)
    noise = make_noise("grid", 2, (8, 8), 0.75, generator=gen)
    _, mask, _ = random_masking(torch.zeros(2, 64, 4), 0.75, noise)
    assert torch.equal(mask.bool(), noise >= 1)
    assert make_noise("random", 2, (8, 8), 0.75) is None
    with pytest.raises(ValueError, match="unknown mask_type"):
        make_noise("checker", 2, (8, 8), 0.75)
