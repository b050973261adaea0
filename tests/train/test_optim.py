import math

import pytest
import torch

import mpp
from mpp.train.optim import absolute_lr, effective_batch, lr_at, pretrain_optimizer, set_lr


def test_lr_scaling_rule():
    assert effective_batch(64, 8, 8) == 4096
    assert absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_warmup_then_half_cycle_cosine():
    base, warm, total = 1e-3, 5, 20
    assert lr_at(0, base, 0.0, warm, total) == 0.0
    assert lr_at(2.5, base, 0.0, warm, total) == pytest.approx(base / 2)
    assert lr_at(5, base, 0.0, warm, total) == pytest.approx(base)
    assert lr_at(12.5, base, 1e-5, warm, total) == pytest.approx(1e-5 + (base - 1e-5) * 0.5)
    assert lr_at(20, base, 1e-5, warm, total) == pytest.approx(1e-5)
    mid = 5 + 15 * 0.25
    assert lr_at(mid, base, 0.0, warm, total) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_pretrain_optimizer_groups_are_official():
    model = mpp.create_model("mae_vit_micro_patch4")
    opt = pretrain_optimizer(model, 1e-3, 0.05, (0.9, 0.95))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    free = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "cls_token" in decayed and "mask_token" in decayed  # 3-D tokens are decayed, as the official groups
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert "blocks.0.attn.qkv.bias" in free and "norm.weight" in free and "decoder_norm.bias" in free
    assert "pos_embed" not in decayed | free and "decoder_pos_embed" not in decayed | free  # fixed tables
    assert opt.defaults["betas"] == (0.9, 0.95)
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    opt.param_groups[0]["lr_scale"] = 0.1
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_fixed_tables_do_not_move_in_training():
    model = mpp.create_model("mae_vit_micro_patch4")
    before = model.pos_embed.detach().clone(), model.decoder_pos_embed.detach().clone()
    opt = pretrain_optimizer(model, 1e-2, 0.05, (0.9, 0.95))
    for _ in range(2):
        model(torch.randn(4, 1, 28, 28)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.pos_embed, before[0]) and torch.equal(model.decoder_pos_embed, before[1])
