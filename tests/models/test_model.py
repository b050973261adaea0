import pytest
import torch

import mpp
from mpp.masking import patchify

SMALL = {"img_size": 16, "patch_size": 4}  # shrink every variant to a 4x4 grid


def small(name: str, **kw) -> mpp.MaskedAutoencoder:
    cfg = mpp.model_config(name)
    # Keep each variant's architecture family but cap sizes so the big ones run on a CPU in a test.
    heads = cfg["num_heads"]
    dec_heads = cfg["decoder_num_heads"]
    overrides = {
        **SMALL,
        "depth": min(cfg["depth"], 2),
        "embed_dim": heads * 8,
        "decoder_embed_dim": dec_heads * 4,
        "decoder_depth": min(cfg["decoder_depth"], 2),
        **kw,
    }
    return mpp.create_model(name, **overrides)


@pytest.mark.parametrize("name", mpp.list_models())
@pytest.mark.parametrize("norm_pix", [False, True])
def test_every_variant_forward_backward_finite(name, norm_pix):
    torch.manual_seed(0)
    model = small(name, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, model.in_chans, 16, 16)
    out = model(imgs)
    assert out.pred.shape == (2, 16, 16 * model.in_chans)
    assert out.mask.shape == (2, 16) and out.ids_restore.shape == (2, 16)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None  # fixed sin-cos tables


@pytest.mark.parametrize("name", mpp.list_models())
def test_variant_at_native_size_builds(name):
    # The real sizes: the paper's ViT-B/L/H shapes, checked without allocating them (meta device).
    with torch.device("meta"):
        model = mpp.create_model(name)
    cfg = mpp.model_config(name)
    assert model.blocks[0].attn.qkv.weight.shape == (3 * cfg["embed_dim"], cfg["embed_dim"])
    assert len(model.blocks) == cfg["depth"] and len(model.decoder_blocks) == cfg["decoder_depth"]
    if name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        assert (model.decoder_embed_dim, len(model.decoder_blocks), model.decoder_blocks[0].attn.num_heads) == (
            512,
            8,
            16,
        )


def test_paper_parameter_counts():
    # ViT-B/16 encoder 86M, ViT-L/16 304M, as in the paper's table of encoders.
    with torch.device("meta"):
        base = mpp.create_model("mae_vit_base_patch16")
        large = mpp.create_model("mae_vit_large_patch16")

    def count(m):
        return sum(p.numel() for k, p in m.encoder_state_dict().items() if k != "pos_embed")

    assert 85.5e6 < count(base) < 86.5e6
    assert 303e6 < count(large) < 305e6


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="mae_vit_base_patch16") as err:
        mpp.create_model("mae_vit_bse_patch16")
    assert "did you mean" in str(err.value)


def test_state_dict_keys_equal_official_layout():
    with torch.device("meta"):
        model = mpp.create_model("mae_vit_base_patch16")
    sd = model.state_dict()
    expected_top = {
        "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,), "norm.weight": (768,), "norm.bias": (768,), "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, 197, 512), "decoder_embed.weight": (512, 768), "decoder_embed.bias": (512,),
        "decoder_norm.weight": (512,), "decoder_norm.bias": (512,), "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }  # fmt: skip
    block = {
        "norm1.weight": (768,), "norm1.bias": (768,), "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
        "attn.proj.weight": (768, 768), "attn.proj.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
        "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,), "mlp.fc2.weight": (768, 3072),
        "mlp.fc2.bias": (768,),
    }  # fmt: skip
    expected = dict(expected_top)
    for i in range(12):
        expected.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    for i in range(8):
        expected.update(
            {
                f"decoder_blocks.{i}.{k}": (s[0] * 512 // 768,) + tuple(d * 512 // 768 for d in s[1:])
                for k, s in block.items()
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_official_initialisation():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4")
    assert torch.all(model.pos_embed[0, 0] == 0) and torch.all(model.decoder_pos_embed[0, 0] == 0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.all(module.bias == 0), name
            bound = (6 / (module.in_features + module.out_features)) ** 0.5
            assert module.weight.abs().max() <= bound, name
            assert module.weight.abs().max() > 0.8 * bound, name  # uniform over the full xavier range
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert 0.01 < model.cls_token.std() < 0.04 and 0.01 < model.mask_token.std() < 0.04


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4", norm_pix_loss=True)
    imgs = torch.randn(3, 1, 28, 28)
    out = model(imgs, noise=torch.rand(3, 49))
    tampered = out.pred.clone()
    visible = out.mask == 0
    tampered[visible] = tampered[visible] + 100.0 * torch.randn_like(tampered[visible])
    assert torch.equal(model.forward_loss(imgs, tampered, out.mask), out.loss)
    masked = out.mask == 1
    tampered[masked] = tampered[masked] + 1.0
    assert not torch.equal(model.forward_loss(imgs, tampered, out.mask), out.loss)


def test_loss_equals_manual_mse_on_masked():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4")
    imgs = torch.randn(2, 1, 28, 28)
    out = model(imgs)
    target = patchify(imgs, 4)
    m = out.mask.bool()
    assert torch.allclose(out.loss, ((out.pred[m] - target[m]) ** 2).mean(), atol=1e-6)


def test_same_noise_same_mask_and_output():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4").eval()
    imgs, noise = torch.randn(2, 1, 28, 28), torch.rand(2, 49)
    a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred)


@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_structured_mask_types_train(mask_type):
    model = mpp.create_model("mae_vit_micro_patch4", mask_type=mask_type)
    out = model(torch.randn(2, 1, 28, 28))
    assert torch.all(out.mask.sum(1) == 49 - 12)
    out.loss.backward()


def test_encoder_features_grid_order_and_pooling():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4").eval()
    imgs = torch.randn(2, 1, 28, 28)
    tokens = model.forward_features(imgs)
    assert tokens.shape == (2, 50, 64)
    # With mask ratio 0 and identity noise order (0, 1, 2, ...), the masked path keeps grid order and must agree.
    latent, mask, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(49.0).expand(2, -1))
    assert torch.allclose(latent, tokens, atol=1e-5) and mask.sum() == 0
    assert torch.equal(model.embed(imgs), tokens[:, 0])
    assert torch.allclose(model.pool(tokens, "avg"), tokens[:, 1:].mean(1))


def test_encoder_options_avg_pool_no_cls_learned_pos_multispectral():
    enc = mpp.ViTEncoder(
        img_size=(16, 24),
        patch_size=8,
        in_chans=5,
        embed_dim=32,
        depth=1,
        num_heads=2,
        class_token=False,
        global_pool="avg",
        pos_embed="learned",
        drop_path_rate=0.1,
    )
    enc.init_encoder_weights()
    assert enc.grid_size == (2, 3) and enc.pos_embed.requires_grad
    assert enc(torch.randn(2, 5, 16, 24)).shape == (2, 32)
    with pytest.raises(ValueError, match="class_token"):
        mpp.ViTEncoder(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="divisible"):
        mpp.ViTEncoder(img_size=30, patch_size=16)


def test_set_grid_resizes_position_table():
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4", pos_embed="learned")
    cls_row = model.pos_embed[0, 0].clone()
    model.set_grid(32)
    assert model.pos_embed.shape == (1, 1 + 64, 64) and model.grid_size == (8, 8)
    assert torch.equal(model.pos_embed[0, 0], cls_row)
    assert model.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 65, 64)
    encoder = mpp.ViTEncoder(**model.encoder_config)  # a new patch size is for encoders (an MAE keeps its pixel head)
    encoder.set_grid(32, patch_size=8)
    assert encoder.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 17, 64)


def test_pred_to_pixels_inverts_norm_pix_target():
    model = mpp.create_model("mae_vit_micro_patch4", norm_pix_loss=True)
    imgs = torch.rand(2, 1, 28, 28)
    # A perfect norm-pix prediction maps back to the input image.
    assert torch.allclose(model.pred_to_pixels(imgs, model.target_patches(imgs)), imgs, atol=1e-5)
