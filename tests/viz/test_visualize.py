"""mpp visualize: attention, rollout, position similarity, PCA, honest norm-pix reconstruction, index.html."""

from __future__ import annotations

import html
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpp.formats.native import save_encoder, save_mae
from mpp.masking import patchify
from mpp.models.mae import MaskedAutoencoder, visible_patch_stats
from mpp.models.vit import ViTEncoder
from mpp.pos_embed import sincos_2d
from mpp.viz import attention as explain
from mpp.viz import figures, visualize

MICRO = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def micro_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True, **{**MICRO, **kw}
    )


def test_attention_probabilities_are_what_the_block_computes():
    model = micro_mae().eval()
    imgs = torch.randn(3, 1, 16, 16)
    maps = explain.attention_maps(model, imgs)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    for probs in maps:
        assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 17), atol=1e-5)
    # Recompute block 0's attention output from the recorded probabilities: it must equal the (fused) module's.
    block = model.blocks[0]
    x = block.norm1(model.prepend_cls(model.embed_patches(imgs)))
    attn = block.attn
    v = attn.qkv(x).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]
    mixed = (maps[0] @ v).transpose(1, 2).reshape(3, 17, 32)
    with torch.no_grad():
        assert torch.allclose(attn.proj(attn.norm(mixed)), attn(x), atol=1e-5)
    assert not any(b.attn._forward_pre_hooks for b in model.blocks)  # hooks removed


def test_rollout_rows_sum_to_one_and_identity_without_attention():
    maps = [torch.softmax(torch.randn(2, 3, 5, 5), dim=-1) for _ in range(4)]
    rollout = explain.attention_rollout(maps)
    assert rollout.shape == (2, 5, 5)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 5), atol=1e-5)
    eye = torch.eye(5).expand(2, 3, 5, 5)
    assert torch.allclose(explain.attention_rollout([eye, eye]), torch.eye(5).expand(2, 5, 5))


def test_query_attention_cls_row_and_mean_token():
    probs = torch.softmax(torch.randn(2, 3, 17, 17), dim=-1)
    cls_map = explain.query_attention(probs, 1, (4, 4))
    assert cls_map.shape == (2, 3, 4, 4)
    assert torch.allclose(cls_map.flatten(2).sum(-1), 1 - probs[:, :, 0, 0], atol=1e-5)
    no_cls = torch.softmax(torch.randn(2, 3, 16, 16), dim=-1)
    mean_map = explain.query_attention(no_cls, 0, (4, 4))
    assert torch.allclose(mean_map.flatten(2).sum(-1), torch.ones(2, 3), atol=1e-5)


def test_sincos_position_similarity_peaks_on_itself_then_grid_neighbours():
    h, w = 7, 7
    sim = explain.position_similarity(sincos_2d(64, (h, w), 1), 1, (h, w))
    assert sim.shape == (h, w, h, w)
    for i in range(h):
        for j in range(w):
            m = sim[i, j].clone()
            assert divmod(int(m.argmax()), w) == (i, j) and torch.isclose(m[i, j], torch.tensor(1.0))
            m[i, j] = -2
            best = divmod(int(m.argmax()), w)
            assert abs(best[0] - i) + abs(best[1] - j) == 1  # the next most similar is a 4-neighbour


def test_pca_colours_range_and_shape():
    tokens = torch.randn(3, 16, 32)
    for joint in (True, False):
        colours = explain.pca_colours(tokens, (4, 4), joint=joint)
        assert colours.shape == (3, 3, 4, 4)
        assert colours.min() >= 0 and colours.max() <= 1
    per_image = explain.pca_colours(tokens, (4, 4), joint=False)
    for i in range(3):  # each image uses its own full range
        assert torch.allclose(per_image[i].flatten(1).amax(1), torch.ones(3))


def test_visible_stats_never_read_hidden_pixels():
    imgs = torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, [0, 5, 10, 15]] = 1
    mean, std = visible_patch_stats(imgs, mask, 4, (4, 4))
    changed = imgs.clone()
    hidden = patchify(changed, 4)
    hidden[:, [0, 5, 10, 15]] = torch.rand(2, 4, 16) * 5  # rewrite the hidden patches
    from mpp.masking import unpatchify

    changed = unpatchify(hidden, 4, (4, 4), 1)
    mean2, std2 = visible_patch_stats(changed, mask, 4, (4, 4))
    assert torch.allclose(mean, mean2) and torch.allclose(std, std2)
    own = patchify(imgs, 4)
    visible = mask[0] == 0
    assert torch.allclose(mean[:, visible, 0], own[:, visible].mean(-1), atol=1e-6)
    with pytest.raises(ValueError, match="every patch is masked"):
        visible_patch_stats(imgs, torch.ones(2, 16), 4, (4, 4))


def test_mae_set_grid_moves_decoder_table():
    model = micro_mae()
    model.set_grid(32)
    assert model.grid_size == (8, 8)
    assert torch.allclose(model.decoder_pos_embed[0], sincos_2d(16, (8, 8), 1))
    out = model(torch.randn(2, 1, 32, 32))
    assert out.pred.shape == (2, 64, 16) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="keeps its patch size"):
        model.set_grid(32, patch_size=8)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.captions = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        self.captions += tag == "figcaption"


def _image_folder(root: Path, count: int = 3) -> Path:
    folder = root / "imgs"
    folder.mkdir()
    for i in range(count):
        Image.fromarray((torch.rand(20, 24) * 255).byte().numpy(), mode="L").save(folder / f"img{i}.png")
    return folder


def _page(out: Path) -> _Images:
    parser = _Images()
    parser.feed((out / "index.html").read_text())
    for src in parser.sources:
        assert (out / src).is_file() and (out / src).stat().st_size > 0, src
    assert parser.captions == len(parser.sources)
    return parser


@pytest.mark.slow
def test_visualize_mae_page_references_every_picture(tmp_path):
    run = tmp_path / "run"
    save_mae(micro_mae(pos_embed="learned"), run / "mae.safetensors", mean=[0.5], std=[0.25])
    out = tmp_path / "out"
    code = visualize.main(
        [
            str(run),
            str(_image_folder(tmp_path)),
            "--out",
            str(out),
            "--mask-ratios",
            "0.5,0.75",
            "--mask-types",
            "random,block",
        ]
    )
    assert code == 0
    page = _page(out)
    names = set(page.sources)
    assert {
        "recon_random_50.png",
        "recon_block_75.png",
        "recon_large_32.png",
        "attention.png",
        "pos_embed.png",
        "pos_embed_resized.png",
        "pos_embed_sincos.png",
        "pca.png",
    } <= names
    assert len(names) == 4 + 1 + 1 + 3 + 1


def test_visualize_encoder_without_cls_skips_reconstruction(tmp_path):
    torch.manual_seed(0)
    encoder = ViTEncoder(**MICRO, class_token=False, global_pool="avg")
    save_encoder(encoder, tmp_path / "encoder.safetensors", mean=[0.5], std=[0.25])
    out = tmp_path / "out"
    assert visualize.main([str(tmp_path / "encoder.safetensors"), str(_image_folder(tmp_path)), "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    assert "mean-token attention" in text and "reconstructions skipped" in text
    assert not any(p.name.startswith("recon") for p in out.iterdir())
    _page(out)


def test_visualize_bad_inputs_are_one_line(tmp_path, capsys):
    save_encoder(ViTEncoder(**MICRO), tmp_path / "encoder.safetensors", mean=[0.5], std=[0.25])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert visualize.main([str(tmp_path / "encoder.safetensors"), str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.png" in err
    assert visualize.main([str(tmp_path / "encoder.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no IMAGES given" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(figures.MissingExtraError, match=r"mpp\[viz\]"):
        figures.pyplot()
    assert visualize.main([str(tmp_path), "x.png", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mpp[viz]" in err


def test_visualize_defaults_to_the_runs_held_out_data(tmp_path):
    run = tmp_path / "run"
    save_mae(micro_mae(), run / "mae.safetensors", mean=[0.5], std=[0.25])
    (run / "config.yaml").write_text("data:\n  source: synthetic\n  synthetic_size: 12\n")
    out = tmp_path / "out"
    assert (
        visualize.main(
            [str(run), "--out", str(out), "--num-images", "3", "--mask-types", "grid", "--mask-ratios", "0.75"]
        )
        == 0
    )
    assert "3 images of the run's data (synthetic, split 'val'" in html.unescape((out / "index.html").read_text())
    _page(out)


def test_reconstruction_grid_names_its_rows():
    from mpp.viz.reconstruction import GRID_PADDING, ROW_NAMES, with_row_names

    cell = 112  # a 28-px image upscaled 4x
    grid = torch.ones(3, GRID_PADDING + 4 * (cell + GRID_PADDING), GRID_PADDING + 2 * (cell + GRID_PADDING))
    picture = np.asarray(with_row_names(grid, ROW_NAMES, cell).convert("L"))
    margin = picture.shape[1] - grid.shape[2]
    assert margin > 0 and (picture[:, margin:] == 255).all()  # the grid itself is untouched
    for i in range(4):  # text in the margin beside every row, and only there
        band = picture[GRID_PADDING + i * (cell + GRID_PADDING) :][:cell, :margin]
        assert (band < 128).any()
