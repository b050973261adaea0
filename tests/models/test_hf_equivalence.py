"""mpp's MAE against Hugging Face's ViTMAEForPreTraining as a numerical oracle (same weights, same noise)."""

import pytest
import torch
import transformers  # noqa: E402  (a dev dependency: the oracle is always installed)

import mpp
from mpp.formats.hf import hf_config_kwargs, hf_to_mpp, mpp_to_hf


def tiny_model(norm_pix: bool, in_chans: int = 3) -> mpp.MaskedAutoencoder:
    torch.manual_seed(0)
    model = mpp.create_model(
        "mae_vit_micro_patch4", img_size=16, in_chans=in_chans, embed_dim=32, depth=2, num_heads=4,
        decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, norm_pix_loss=norm_pix,
    )  # fmt: skip
    # Move biases and norms off their init values so a wrong mapping of any tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_twin(model: mpp.MaskedAutoencoder):
    config = transformers.ViTMAEConfig(
        **hf_config_kwargs(model), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    hf = transformers.ViTMAEForPreTraining(config).eval()
    # Copy every tensor, position tables included (HF leaves them at zero when built from a config).
    missing, unexpected = hf.load_state_dict(mpp_to_hf(model.state_dict()), strict=False)
    assert not unexpected
    assert not [k for k in missing if "position" in k or "pos_embed" in k]
    assert not missing, missing
    return hf


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_loss_and_pred_equal_huggingface(norm_pix, in_chans):
    model = tiny_model(norm_pix, in_chans)
    hf = hf_twin(model)
    torch.manual_seed(1)
    imgs = torch.randn(3, in_chans, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        ours = model(imgs, mask_ratio=0.75, noise=noise)
        theirs = hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.ids_restore, theirs.ids_restore)
    assert torch.allclose(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_hf_mapping_round_trip_preserves_every_tensor():
    model = tiny_model(False)
    sd = model.state_dict()
    back = hf_to_mpp(mpp_to_hf(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    for layout in ("v4", "v5"):
        again = hf_to_mpp(mpp_to_hf(sd, layout=layout))
        assert all(torch.equal(again[k], sd[k]) for k in sd)
