import math

import pytest
import torch

from mpp.pos_embed import resize_pos_embed, sincos_2d


def closed_form(dim: int, h: int, w: int) -> torch.Tensor:
    """The official table written out element by element: column code first, then row code."""
    quarter = dim // 4
    table = torch.zeros(h * w, dim, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                table[r * w + c, k] = math.sin(c * omega)
                table[r * w + c, quarter + k] = math.cos(c * omega)
                table[r * w + c, 2 * quarter + k] = math.sin(r * omega)
                table[r * w + c, 3 * quarter + k] = math.cos(r * omega)
    return table


@pytest.mark.parametrize("dim,h,w", [(16, 4, 4), (32, 3, 5), (8, 7, 7)])
def test_sincos_matches_closed_form(dim, h, w):
    table = sincos_2d(dim, (h, w), num_extra_tokens=1)
    assert table.shape == (1 + h * w, dim)
    assert torch.all(table[0] == 0)
    assert torch.allclose(table[1:].double(), closed_form(dim, h, w), atol=1e-7)


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 4)


def test_resize_keeps_extra_tokens_and_is_identity_on_same_grid():
    table = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(table, (4, 4), (4, 4))
    assert torch.equal(same, table)
    bigger = resize_pos_embed(table, (4, 4), (6, 8))
    assert bigger.shape == (1, 1 + 48, 8)
    assert torch.equal(bigger[:, 0], table[:, 0])


def test_resize_of_smooth_table_approximates_new_table():
    # Bicubic resizing of a smooth (low-frequency) table stays close to the same function sampled at the new grid's
    # patch centres (align_corners=False treats each row as a patch centre at (i + 0.5) / h).
    def table(h, w):
        rows, cols = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
        r, c = torch.meshgrid(rows, cols, indexing="ij")
        return torch.stack([torch.sin(r + c), torch.cos(2 * r - c)], -1).reshape(1, h * w, 2)

    out = resize_pos_embed(table(8, 8), (8, 8), (12, 12), num_extra_tokens=0)
    assert (out - table(12, 12)).abs().max() < 0.08


def test_resize_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="rows"):
        resize_pos_embed(torch.randn(1, 10, 4), (3, 3), (4, 4), num_extra_tokens=0)
