import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_runs import TINY, final_weights, load_checkpoint, tiny_config
from safetensors.torch import load_file

import mpp.train.pretrain as pretrain
from mpp.config import ConfigError, PretrainConfig, build_config
from mpp.config.command import parse_command_line, resolve_command_config
from mpp.formats.native import load_encoder
from mpp.train.checkpoint import latest_checkpoint


# A tiny, fast run: micro model, 64 synthetic images, batch 8 -> 8 steps per epoch.
# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.bogus=1", "unknown config key 'optim.bogus'"),
        ("optim.epochs=ten", "optim.epochs: expected an integer"),
        ("model.mask_ratio=1.0", "model.mask_ratio=1.0: must be strictly between 0 and 1"),
        ("model.mask_ratio=0", "model.mask_ratio=0.0"),
        ("model.img_size=30", "model.img_size=30: must be a positive multiple of the patch size 4"),
        ("model.name=mae_vit_nope", "model.name='mae_vit_nope': unknown model"),
        ("data.source=folder", "data.path=None: is required for source folder"),
        ("mixed_precision=fp8", "mixed_precision='fp8'"),
        ("optim.betas=[0.9]", "optim.betas"),
    ],
)
def test_bad_config_is_one_line_error_before_anything_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    code = pretrain.main([*TINY, f"output_dir={out}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_recipe_errors_name_the_file_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  nam: mae_vit_micro_patch4\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.nam'"):
        build_config(PretrainConfig, recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(PretrainConfig, tmp_path / "missing.yaml")


def test_shipped_recipes_load_and_state_paper_values():
    recipes = sorted(Path(__file__).parents[2].glob("recipes/mae_vit_*ep.yaml"))
    assert len(recipes) == 6
    for path in recipes:
        cfg = build_config(PretrainConfig, path)
        assert (cfg.optim.blr, cfg.optim.warmup_epochs, cfg.optim.weight_decay) == (1.5e-4, 40, 0.05)
        assert cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75 and cfg.optim.betas == [0.9, 0.95]
        assert cfg.optim.epochs in (800, 1600)
        assert cfg.optim.batch_size * cfg.optim.accum_steps * 64 == 4096  # 64 GPUs as the paper
    for path in Path(__file__).parents[2].glob("recipes/fmnist_*.yaml"):
        build_config(PretrainConfig, path)


def test_small_float_override_without_dot_parses():
    assert build_config(PretrainConfig, None, ["optim.blr=5e-4"]).optim.blr == 5e-4


# ------------------------------------------------------------------------------------------------ runs
def test_run_writes_everything_and_learns(tmp_path):
    out = pretrain.run(tiny_config(tmp_path / "run", "optim.epochs=4"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["name"] == "mae_vit_micro_patch4"
    assert saved["_run"]["mpp_version"] and saved["_run"]["git_commit"]
    assert saved["_run"]["effective_batch"] == 8 and saved["_run"]["lr"] == pytest.approx(1e-3 * 8 / 256)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["stage"] == "pretrain"]  # the kNN monitor's readings are "monitor"
    assert [r["step"] for r in records] == list(range(1, 33))
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= records[0].keys()
    assert records[0]["lr"] == 0.0  # linear warmup starts at 0
    first, last = sum(r["loss"] for r in records[:4]) / 4, sum(r["loss"] for r in records[-4:]) / 4
    assert last < first
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "recon").glob("*.png")) == [
        "epoch_001.png", "epoch_002.png", "epoch_003.png", "epoch_004.png", "final.png",
    ]  # fmt: skip
    encoder, meta = load_encoder(out / "encoder.safetensors")
    assert meta["variant"] == "mae_vit_micro_patch4" and meta["norm_pix_loss"] is True and len(meta["mean"]) == 1
    from mpp.formats.native import load_mae

    mae, _ = load_mae(out / "mae.safetensors")
    ckpt = final_weights(out)
    assert all(torch.equal(mae.state_dict()[k], ckpt[k]) for k in ckpt)
    assert all(torch.equal(encoder.state_dict()[k], ckpt[k]) for k in encoder.state_dict())
    assert len([p for p in (out / "checkpoints").iterdir() if p.is_dir()]) == 2  # keep_checkpoints


def test_resume_is_bit_identical(tmp_path):
    # Stopped mid-epoch (5), resumed and stopped again at an epoch boundary (8), then resumed to the end: one run cut
    # twice, with drop path and block masking in play, ends where an uncut run ends.
    extra = ("optim.accum_steps=1", "model.drop_path_rate=0.1", "model.mask_type=block")
    full = pretrain.run(tiny_config(tmp_path / "full", *extra))
    pretrain.run(tiny_config(tmp_path / "split", *extra, "stop_at_step=5"))
    for stop in (8, None):
        assert latest_checkpoint(tmp_path / "split").name == ("step_00000005" if stop else "step_00000008")
        assert not (tmp_path / "split" / "encoder.safetensors").exists()
        given = ["--resume", str(tmp_path / "split"), f"stop_at_step={stop or 'null'}"]
        pretrain.run(resolve_command_config(PretrainConfig, parse_command_line("mpp pretrain", "", given, False)))
    a, b = final_weights(full), final_weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_opt = load_checkpoint(latest_checkpoint(full))[1]["optimizer"]["state"]
    split_opt = load_checkpoint(latest_checkpoint(tmp_path / "split"))[1]["optimizer"]["state"]
    assert all(torch.equal(full_opt[i]["exp_avg_sq"], split_opt[i]["exp_avg_sq"]) for i in full_opt)


def test_resume_with_accumulation_is_bit_identical(tmp_path):
    extra = ("optim.accum_steps=2", "optim.batch_size=4")
    full = pretrain.run(tiny_config(tmp_path / "full", *extra))
    pretrain.run(tiny_config(tmp_path / "split", *extra, "stop_at_step=3"))
    pretrain.run(tiny_config(tmp_path / "split", *extra))  # automatic resume: same settings, checkpoint present
    a, b = final_weights(full), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_resume_refuses_changed_settings(tmp_path):
    pretrain.run(tiny_config(tmp_path / "run", "stop_at_step=2"))
    with pytest.raises(ConfigError, match="different settings"):
        pretrain.run(tiny_config(tmp_path / "run", "optim.blr=1e-2"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_loss, capsys):
    out = tmp_path / "run"
    nan_loss(6)
    code = pretrain.main([*TINY, f"output_dir={out}", "checkpoint_every_steps=2"])
    err = capsys.readouterr().err
    assert code == 3 and "loss is nan at step 6" in err  # the step whose loss it was
    good = latest_checkpoint(out)
    assert good.name == "step_00000004"
    state = load_checkpoint(good)[0]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (out / "encoder.safetensors").exists()


def test_crash_during_checkpoint_write_keeps_previous_latest(tmp_path, monkeypatch):
    import mpp.train.checkpoint as ckpt

    out = tmp_path / "run"
    pretrain.run(tiny_config(out, "stop_at_step=4", "checkpoint_every_steps=2"))
    before = latest_checkpoint(out)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain.run(tiny_config(out, "checkpoint_every_steps=2"))
    assert latest_checkpoint(out) == before
    load_checkpoint(before)  # still complete and readable


def test_folder_source_and_limit(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            color = (i * 20, 100, 200) if cls == "cats" else (200, i * 20, 50)
            Image.new("RGB", (40, 36), color).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = tiny_config(tmp_path / "run", "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.limit=16",
                      "model.in_chans=3", "model.img_size=16", "optim.epochs=1")  # fmt: skip
    out = pretrain.run(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["_run"]["dataset_size"] == 16 and saved["_run"]["steps_per_epoch"] == 2
    assert load_file(out / "encoder.safetensors")["patch_embed.proj.weight"].shape[1] == 3


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes_track_one_process(tmp_path):
    """2 processes x batch 4 see the same samples, augmentations and masks as 1 process x batch 8 (conv stem)."""
    common = [
        *TINY,
        "optim.epochs=1",
        "model.drop_path_rate=0.0",
        "model.stem=conv",
    ]  # linear: the other 2-process runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "mpp", "pretrain", *common, f"output_dir={tmp_path / 'one'}"],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517", "-m", "mpp", "pretrain", *common, "optim.batch_size=4",
              f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    double = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())
    assert saved["_run"]["world_size"] == 2 and saved["_run"]["effective_batch"] == 8
    one = [
        r["loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    two = [
        r["loss"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(one) == len(two) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True)) < 1e-4
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
