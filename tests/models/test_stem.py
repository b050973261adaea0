"""The conv stem (``model.stem=conv``): per-patch convolutions, so no visible token ever sees a masked pixel."""

import pytest
import torch
from pretrain_runs import final_weights, tiny_config

import mpp
import mpp.train.pretrain as pretrain
from mpp.formats import export_model
from mpp.formats.native import load_encoder, save_encoder
from mpp.masking import random_masking

MICRO = "mae_vit_micro_patch4"


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_visible_tokens_never_see_masked_pixels(stem):
    torch.manual_seed(0)
    model = mpp.create_model(MICRO, stem=stem).eval()
    imgs = torch.randn(2, 1, 28, 28)
    noise = torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(1))
    _, mask, _ = random_masking(torch.zeros(2, model.num_patches, 1), 0.75, noise)
    pixel_mask = mask.view(2, 1, 7, 1, 7, 1).expand(2, 1, 7, 4, 7, 4).reshape(2, 1, 28, 28).bool()
    with torch.no_grad():
        latent = model.forward_encoder(imgs, 0.75, noise)[0]
        hidden_changed = model.forward_encoder(torch.where(pixel_mask, 5 * torch.randn_like(imgs), imgs), 0.75, noise)
        shown_changed = model.forward_encoder(torch.where(pixel_mask, imgs, imgs + 1), 0.75, noise)
    torch.testing.assert_close(hidden_changed[0], latent, rtol=0, atol=1e-6)  # masked pixels: no visible token moves
    assert (shown_changed[0] - latent).abs().max() > 1e-3  # visible pixels do move them: the check can fail


def test_conv_stem_round_trips_resizes_and_refuses_what_it_cannot_be(tmp_path):
    model = mpp.create_model(MICRO, stem="conv")
    assert model.encoder_config["stem"] == "conv" and "stem" not in mpp.create_model(MICRO).encoder_config
    save_encoder(model, tmp_path / "encoder.safetensors")
    encoder, _ = load_encoder(tmp_path / "encoder.safetensors")
    imgs = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(encoder.eval()(imgs), model.eval().forward_features(imgs)[:, 0])
    encoder.set_grid(32)  # a new size: the per-patch weights apply to any grid
    assert encoder(torch.randn(1, 1, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="stem=conv keeps its patch size"):
        encoder.set_grid(28, 7)
    for target in ("timm", "hf"):
        with pytest.raises(ValueError, match=f"no {target} ViT equivalent.*--to mpp"):
            export_model(model, tmp_path / target, target)


def test_conv_stem_pretraining_resumes_bit_identically(tmp_path):
    extra = ("model.stem=conv", "optim.epochs=1")
    full = pretrain.run(tiny_config(tmp_path / "full", *extra))
    pretrain.run(tiny_config(tmp_path / "split", *extra, "stop_at_step=3"))
    pretrain.run(tiny_config(tmp_path / "split", *extra))  # automatic resume
    a, b = final_weights(full), final_weights(tmp_path / "split")
    assert any(k.startswith("patch_embed.convs") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
