"""Weights in and out: official MAE, timm and Hugging Face checkpoints built locally (random weights, real layouts)."""

import argparse
import json
import pathlib

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import mpp
from mpp.cli import main as cli_main
from mpp.formats import (
    ShapeMismatchError,
    detect_format,
    load_checkpoint,
    load_weights,
    save_hf,
    save_mpp,
    save_timm,
)
from mpp.formats.hf import mpp_to_hf
from mpp.formats.official import default_decoder_num_heads, default_num_heads

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_DECODER = {"decoder_embed_dim": 24, "decoder_depth": 1, "decoder_num_heads": 3}
HEADS = {"num_heads": 2, "decoder_num_heads": 3}  # not the table's guesses, so every test passes them


def tiny_mae(**kw) -> mpp.MaskedAutoencoder:
    torch.manual_seed(0)
    model = mpp.create_model("mae_vit_micro_patch4", **{**TINY, **TINY_DECODER, **kw})
    with torch.no_grad():  # move biases and norms off their init so a wrong mapping of any tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_encoder(**kw) -> mpp.ViTEncoder:
    torch.manual_seed(0)
    encoder = mpp.ViTEncoder(**{**TINY, **kw})
    encoder.init_encoder_weights()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name != "pos_embed" or encoder.pos_embed_type == "learned":
                p.copy_(torch.randn_like(p) * 0.2)
    return encoder.eval()


def load_checkpoint_from(tmp_path, state, **overrides):
    path = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return load_checkpoint(path, **overrides)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def imgs() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ official MAE
def test_official_full_checkpoint_loads_strict(tmp_path):
    model = tiny_mae()
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": model.state_dict()}, path)
    # Same names as the official models_mae.py: a plain strict load works ...
    fresh = mpp.create_model("mae_vit_micro_patch4", **TINY, **TINY_DECODER)
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert same_tensors(fresh.state_dict(), model.state_dict())
    # ... and so does mpp's reader, which builds the model from the shapes.
    loaded, info = load_checkpoint(path, **HEADS)
    assert isinstance(loaded, mpp.MaskedAutoencoder) and info.format == "official" and info.has_decoder
    assert same_tensors(loaded.state_dict(), model.state_dict())
    noise = torch.rand(2, 16)
    assert torch.equal(loaded.eval()(imgs(), noise=noise).loss, model(imgs(), noise=noise).loss)


def test_official_encoder_only_file_gives_an_encoder(tmp_path):
    model = tiny_mae()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": model.encoder_state_dict()}, path)
    encoder, info = load_checkpoint(path, num_heads=2)
    assert type(encoder) is mpp.ViTEncoder and not info.has_decoder
    assert same_tensors(encoder.state_dict(), model.encoder_state_dict())
    assert torch.equal(encoder.forward_features(imgs()), model.forward_features(imgs()))
    target = mpp.ViTEncoder(**TINY)
    load_weights(target, path)
    assert same_tensors(target.state_dict(), model.encoder_state_dict())


def test_official_training_checkpoint_with_args_namespace_loads(tmp_path):
    model = tiny_mae()
    path = tmp_path / "checkpoint-799.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, norm_pix_loss=True, input_size=224)
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}}, "epoch": 799, "args": args}, path)
    loaded, info = load_checkpoint(path, **HEADS)
    assert same_tensors(loaded.state_dict(), model.state_dict())
    assert any("ignored" in note and "args" in note for note in info.notes)


def test_default_heads_follow_the_standard_vit_table():
    assert [default_num_heads(d) for d in (192, 384, 768, 1024, 1280, 512, 96)] == [3, 6, 12, 16, 16, 8, 1]
    assert [default_decoder_num_heads(d) for d in (512, 256, 128, 24)] == [16, 8, 4, 1]


def test_inferred_architecture_is_reported(tmp_path):
    path = tmp_path / "enc.pth"
    torch.save({"model": tiny_mae().encoder_state_dict()}, path)
    _, info = load_checkpoint(path)
    assert info.config["num_heads"] == 1 and any("num_heads=1 assumed" in n for n in info.notes)
    assert info.config["img_size"] == [16, 16] and info.config["pos_embed"] == "sincos"


# ------------------------------------------------------------------------------------------------ safety
class _TouchOnLoad:
    """A pickle payload that creates a file when unpickled (a stand-in for arbitrary code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    control_marker, marker = tmp_path / "control_ran", tmp_path / "payload_ran"
    # Control: the payload is live (a plain unpickle does create its marker) ...
    torch.save({"x": _TouchOnLoad(control_marker)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control_marker.exists()
    # ... but mpp refuses the same kind of file, in one line naming it, and the payload never runs.
    evil = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": tiny_mae().state_dict(), "x": _TouchOnLoad(marker)}, evil)
    with pytest.raises(ValueError, match="contains code or objects that are not plain tensors") as err:
        load_checkpoint(evil)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert cli_main(["convert", str(evil), str(tmp_path / "out")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_data_only_extras_are_refused_but_called_harmless(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": tiny_mae().state_dict(), "best_acc": np.float64(0.9)}, path)
    with pytest.raises(ValueError, match=r"numpy.*look like harmless training extras"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize(
    "encoder_kw",
    [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg", "pos_embed": "learned"},
     {"in_chans": 1, "img_size": (16, 8)}],
    ids=["token", "avg", "no-cls", "gray-nonsquare"],
)  # fmt: skip
def test_mpp_timm_mpp_round_trip_and_features(tmp_path, encoder_kw):
    model = tiny_encoder(**encoder_kw)
    weights, config_path = save_timm(model, tmp_path / "vit.safetensors")
    kwargs = json.loads(config_path.read_text())["model_args"]
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    theirs.load_state_dict(load_file(str(weights)), strict=True)
    also = VisionTransformer(**kwargs).eval()  # the same kwargs work on the class directly
    also.load_state_dict(load_file(str(weights)), strict=True)
    x = torch.randn(2, model.in_chans, *model.img_size)
    with torch.no_grad():
        ours_tokens, ours_pooled = model.forward_features(x), model.embed(x)
        tokens = theirs.forward_features(x)
        pooled = theirs.forward_head(tokens, pre_logits=True)
    assert (tokens - ours_tokens).abs().max() <= 1e-5
    assert (pooled - ours_pooled).abs().max() <= 1e-5
    back, info = load_checkpoint(weights)
    assert info.format == "timm" and same_tensors(back.state_dict(), model.state_dict())
    assert back.encoder_config == model.encoder_config


@pytest.mark.parametrize("pth", [False, True])
def test_timm_directory_loads_with_local_dir(tmp_path, pth):
    model = tiny_mae()
    written = save_timm(model, tmp_path / "timm_dir", pth=pth, mean=[0.5] * 3, std=[0.25] * 3)
    assert written[0].name == ("pytorch_model.bin" if pth else "model.safetensors")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm_dir'}", pretrained=True).eval()
    assert list(theirs.pretrained_cfg["mean"]) == [0.5] * 3
    with torch.no_grad():
        assert (theirs.forward_features(imgs()) - model.forward_features(imgs())).abs().max() <= 1e-5
    back, info = load_checkpoint(tmp_path / "timm_dir")
    assert same_tensors(back.state_dict(), model.encoder_state_dict()) and info.metadata["mean"] == [0.5] * 3


def test_timm_native_state_dict_with_head_imports(tmp_path):
    torch.manual_seed(0)
    theirs = VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                               num_classes=10).eval()  # fmt: skip
    torch.save(theirs.state_dict(), tmp_path / "vit_tiny.pth")
    ours, info = load_checkpoint(tmp_path / "vit_tiny.pth", num_heads=2)
    assert info.format == "timm" and info.config["pos_embed"] == "learned"
    assert any("head ignored" in note for note in info.notes)
    with torch.no_grad():
        assert (ours.forward_features(imgs()) - theirs.forward_features(imgs())).abs().max() <= 1e-5


def test_timm_avg_pool_fc_norm_and_no_embed_class(tmp_path):
    torch.manual_seed(0)
    avg = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            global_pool="avg")  # fmt: skip
    sd = avg.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    ours, info = load_checkpoint_from(tmp_path, sd, num_heads=2)
    assert ours.global_pool == "avg" and torch.equal(ours.norm.weight, sd["fc_norm.weight"])
    assert any("fc_norm became norm" in note for note in info.notes)

    no_cls_row = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                   no_embed_class=True).eval()  # fmt: skip
    ours, info = load_checkpoint_from(tmp_path, no_cls_row.state_dict(), num_heads=2)
    with torch.no_grad():
        assert (ours.forward_features(imgs()) - no_cls_row.forward_features(imgs())).abs().max() <= 1e-5


def test_unsupported_timm_options_are_named(tmp_path):
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            reg_tokens=2)  # fmt: skip
    with pytest.raises(ValueError, match="reg_token"):
        load_checkpoint_from(tmp_path, vit.state_dict(), num_heads=2)


# ------------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("norm_pix", [False, True])
def test_mpp_hf_mpp_round_trip_and_loss(tmp_path, norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    with torch.no_grad():  # a learned-looking table: proves the file's table is used, not a recomputed one
        model.pos_embed.add_(0.01 * torch.randn_like(model.pos_embed))
    save_hf(model, tmp_path / "hf", mean=[0.5] * 3, std=[0.25] * 3)
    hf, loading = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    noise = torch.rand(2, 16)
    with torch.no_grad():
        ours, theirs = model(imgs(), noise=noise), hf.eval()(pixel_values=imgs(), noise=noise)
    assert (ours.loss - theirs.loss).abs() <= 1e-5
    assert (ours.pred - theirs.logits).abs().max() <= 1e-5
    back, info = load_checkpoint(tmp_path / "hf")
    assert info.format == "hf" and info.metadata["mean"] == [0.5] * 3 and back.norm_pix_loss == norm_pix
    assert same_tensors(back.state_dict(), model.state_dict())


def test_encoder_to_hf_vitmae_model(tmp_path):
    model = tiny_mae()
    encoder = mpp.ViTEncoder(**model.encoder_config)
    encoder.load_state_dict(model.encoder_state_dict())
    save_hf(encoder, tmp_path / "hf_enc")
    hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf_enc").eval()
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs(), 0.75, noise)
        assert (hf(pixel_values=imgs(), noise=noise).last_hidden_state - latent).abs().max() <= 1e-5
    back, info = load_checkpoint(tmp_path / "hf_enc")
    assert type(back) is mpp.ViTEncoder and same_tensors(back.state_dict(), encoder.state_dict())


def test_hf_directory_in_transformers_v5_layout_reads_too(tmp_path):
    model = tiny_mae()
    save_hf(model, tmp_path / "hf")
    save_file(mpp_to_hf(model.state_dict(), layout="v5"), str(tmp_path / "hf" / "model.safetensors"))
    back, _ = load_checkpoint(tmp_path / "hf")
    assert same_tensors(back.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------------ mpp and errors
def test_mpp_files_round_trip_with_metadata(tmp_path):
    model = tiny_mae(norm_pix_loss=True)
    save_mpp(model, tmp_path / "out", mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], variant="tiny")
    back, info = load_checkpoint(tmp_path / "out")
    assert isinstance(back, mpp.MaskedAutoencoder) and back.norm_pix_loss
    assert same_tensors(back.state_dict(), model.state_dict())
    assert info.metadata["mean"] == [0.1, 0.2, 0.3] and info.metadata["variant"] == "tiny"
    encoder, _ = load_checkpoint(tmp_path / "out", encoder_only=True)
    assert type(encoder) is mpp.ViTEncoder
    assert same_tensors(encoder.state_dict(), model.encoder_state_dict())
    loaded, meta = mpp.formats.native.load_encoder(tmp_path / "out" / "encoder.safetensors")
    assert meta["std"] == [0.4, 0.5, 0.6] and same_tensors(loaded.state_dict(), model.encoder_state_dict())


def test_mpp_training_checkpoint_directory_reads_by_shapes(tmp_path):
    model = tiny_mae()
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    save_file(model.state_dict(), str(step / "model.safetensors"))
    (step / "state.json").write_text('{"step": 10}')
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")
    back, info = load_checkpoint(tmp_path / "run", **HEADS)
    assert info.format == "mpp" and same_tensors(back.state_dict(), model.state_dict())


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": tiny_mae().encoder_state_dict()}, path)
    bigger = mpp.ViTEncoder(**{**TINY, "img_size": 32})
    with pytest.raises(ShapeMismatchError, match=r"pos_embed: .* has \[1, 17, 32\], model expects \[1, 65, 32\]"):
        load_weights(bigger, path)
    with pytest.raises(ShapeMismatchError, match=r"pos_embed"):
        load_checkpoint(path, img_size=32)


def test_detect_format_of_each_layout(tmp_path):
    model = tiny_mae()
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    torch.save(model.encoder_state_dict(), tmp_path / "timm.pth")
    save_hf(model, tmp_path / "hf")
    save_mpp(model, tmp_path / "mpp")
    found = {name: detect_format(tmp_path / name) for name in ("official.pth", "timm.pth", "hf", "mpp")}
    assert found == {"official.pth": "official", "timm.pth": "timm", "hf": "hf", "mpp": "mpp"}


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("target", ["mpp", "timm", "hf"])
def test_cli_converts_official_file(tmp_path, capsys, target):
    model = tiny_mae()
    src = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    torch.save({"model": model.state_dict()}, src)
    dst = tmp_path / "out"
    rc = cli_main(["convert", str(src), str(dst), "--to", target, "--num-heads", "2", "--decoder-num-heads", "3"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "official format" in out and "wrote" in out
    expected = {"mpp": ["encoder.safetensors", "mae.safetensors"], "timm": ["model.safetensors", "config.json"],
                "hf": ["model.safetensors", "config.json"]}[target]  # fmt: skip
    assert all((dst / name).is_file() for name in expected)
    back, _ = load_checkpoint(dst)
    wanted = model.state_dict() if target != "timm" else model.encoder_state_dict()
    assert same_tensors(back.state_dict(), wanted)


def test_cli_help_explains_formats(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("official", "timm", "hf", "mpp", "mae_pretrain_vit_base.pth", "weights_only", "--num-heads"):
        assert word in text
    cli_main(["--help"])
    assert "convert" in capsys.readouterr().out


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("mpp convert: error:")
