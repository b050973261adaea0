"""Every stage on the one engine: exact resume of the probe and fine-tuning after a crash, the shared config (fp32
everywhere, ``model=`` spelled alike, recipe ``include``), one metrics schema, and 2-process runs equal to 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mpp
import mpp.train.engine as engine
from mpp.cli import main as cli_main
from mpp.config import ConfigError, FinetuneConfig, PretrainConfig, build_config
from mpp.formats.native import save_encoder
from mpp.train.checkpoint import checkpoint_dirs

MICRO = "mae_vit_micro_patch4"
SYNTH = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "data.batch_size=64",
         "progress=false", "mixed_precision=fp32"]  # fmt: skip
FINETUNE = ["finetune", "init=random", f"model={MICRO}", *SYNTH, "finetune.epochs=4", "finetune.warmup_epochs=1",
            "finetune.batch_size=16", "finetune.ema=true", "finetune.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    save_encoder(mpp.create_model(MICRO), run / "encoder.safetensors", variant=MICRO, mean=[0.34], std=[0.22])
    return run


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the engine die (like a kill) right after optimiser step ``step``."""
    real = engine.train_one_epoch

    def dying(*args, on_step=None, **kwargs):
        def watch(info):
            if info.step == step:
                raise KeyboardInterrupt
            return on_step(info) if on_step is not None else None

        return real(*args, on_step=watch, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", dying)


@pytest.mark.parametrize("stage", ["finetune", "probe"])
def test_stage_resumes_bit_identically_after_a_crash(tmp_path, monkeypatch, encoder_run, stage):
    if stage == "finetune":
        args, weights_of = FINETUNE, lambda out: load_file(out / "classifier.safetensors")
    else:
        args = ["probe", str(encoder_run), *SYNTH, "probe.epochs=4", "probe.warmup_epochs=1", "probe.batch_size=16",
                "probe.log_every=1"]  # fmt: skip
        weights_of = lambda out: read_checkpoint_weights(out)  # noqa: E731
    full = tmp_path / "full"
    assert cli_main([*args, f"output_dir={full}"]) == 0
    crashed = tmp_path / "crashed"
    crash_at_step(monkeypatch, 11)  # 4 steps per epoch: mid third epoch, after the epoch-2 checkpoint
    assert cli_main([*args, f"output_dir={crashed}"]) == 130  # an interrupt: one line, exit 130
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(crashed)][-1] == "step_00000008"
    assert cli_main([*args, f"output_dir={crashed}"]) == 0  # the same command continues the run
    a, b = weights_of(full), weights_of(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text())["protocols"] for d in (full, crashed))
    assert ra[stage]["top1"] == rb[stage]["top1"]
    steps = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in steps} == {stage}
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= steps[0].keys()


def read_checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from mpp.train.checkpoint import read_checkpoint

    return read_checkpoint(checkpoint_dirs(run_dir)[-1]).model_state


def test_stage_refuses_to_continue_with_other_settings(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    crash_at_step(monkeypatch, 5)
    assert cli_main([*FINETUNE, f"output_dir={out}"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert cli_main([*FINETUNE, f"output_dir={out}", "finetune.blr=1e-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different settings (finetune)" in err and "mpp finetune --resume" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ one config
@pytest.mark.parametrize("stage", ["knn", "probe", "finetune", "evaluate"])
def test_every_stage_accepts_fp32(stage):
    import mpp.config as cfg
    from mpp.config.command import parse_command_line, resolve_command_config

    cls = {"knn": "KnnConfig", "probe": "ProbeConfig", "finetune": "FinetuneConfig", "evaluate": "EvaluateConfig"}
    args = parse_command_line("x", "", ["random", f"model={MICRO}", "mixed_precision=fp32"], takes_init=True)
    assert resolve_command_config(getattr(cfg, cls[stage]), args).mixed_precision == "fp32"
    assert build_config(PretrainConfig, None, ["mixed_precision=fp32"]).mixed_precision == "fp32"


def test_model_is_spelled_the_same_in_every_command():
    # model=NAME everywhere; model.name=NAME is the accepted alias (pretraining's section, a stage's plain name).
    for spelling in (f"model={MICRO}", f"model.name={MICRO}"):
        assert build_config(PretrainConfig, None, [spelling]).model.name == MICRO
        assert build_config(FinetuneConfig, None, [spelling], init="random").model == MICRO
    with pytest.raises(ConfigError, match="model"):
        build_config(FinetuneConfig, None, [f"model.name={MICRO}", "model.depth=3"], init="random")


def test_pretraining_imports_no_evaluation_command():
    # mpp pretrain stands on its own: of the evaluation side it needs only the kNN scorer, a maths leaf.
    code = (
        "import sys, mpp.train.pretrain; print(sorted(m for m in sys.modules if m.startswith(('mpp.eval', 'mpp.n'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mpp.neighbours']"


def test_recipe_include_lays_keys_over_the_included(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  epochs: 7\n  blr: 1.0e-3\nmodel:\n  global_pool: avg\n")
    (tmp_path / "mid.yaml").write_text("include: base.yaml\noptim:\n  epochs: 3\n")
    (tmp_path / "top.yaml").write_text("include: [mid.yaml]\noutput_dir: runs/x\n")
    config = build_config(PretrainConfig, tmp_path / "top.yaml", ["optim.warmup_epochs=0"])
    assert (config.optim.epochs, config.optim.blr, config.model.global_pool) == (3, 1e-3, "avg")
    assert config.output_dir == "runs/x" and config.optim.warmup_epochs == 0
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        build_config(PretrainConfig, tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("include: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml' does not exist .included from"):
        build_config(PretrainConfig, tmp_path / "missing.yaml")


def test_shipped_evaluate_recipe_is_the_probe_and_finetune_recipes():
    from mpp.config import load_yaml

    recipes = Path(__file__).parents[2] / "recipes"
    combined = load_yaml(recipes / "evaluate_fmnist.yaml")
    assert combined["probe"] == load_yaml(recipes / "probe_fmnist.yaml")["probe"]
    assert combined["finetune"] == load_yaml(recipes / "finetune_fmnist.yaml")["finetune"]


# ------------------------------------------------------------------------------------------------ processes
def launch(args: list[str], processes: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "mpp", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "mpp", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_give_one_process_results_for_knn_probe_and_finetune(tmp_path, encoder_run):
    """2 processes x half batch = 1 process x batch, one ``mpp evaluate --finetune`` each (kNN, probe, fine-tune)."""
    args = ["evaluate", str(encoder_run), "--finetune", *SYNTH, "probe.epochs=2", "probe.warmup_epochs=1",
            "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.drop_path_rate=0",
            "finetune.log_every=1", "finetune.head_init=probe", "finetune.mixup=0", "finetune.cutmix=0"]  # fmt: skip
    # The LP-FT head makes the first loss depend on the batch (a random head gives ln 10 on any); mixup is off because
    # it pairs each image with the flipped batch, a process's half batch on 2 processes (as the official code).
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)  # the launched processes run 1 thread each: the same float order
    assert cli_main([*args, "probe.batch_size=16", "finetune.batch_size=16", f"output_dir={one}"]) == 0
    launch([*args, "probe.batch_size=8", "finetune.batch_size=8", f"output_dir={two}"], 2, 29600)
    r1, r2 = (json.loads((d / "results.json").read_text())["protocols"] for d in (one, two))
    assert abs(r1["knn"]["top1"] - r2["knn"]["top1"]) < 1e-6, (r1["knn"], r2["knn"])
    # The probe head's BatchNorm normalises each process's own half batch (as the official probe under DDP), so the
    # two runs differ slightly: the same steps, accuracy within 2 of the 64 test images.
    probe1, probe2 = r1["probe"], r2["probe"]
    assert probe1["steps"] == probe2["steps"] and abs(probe1["top1"] - probe2["top1"]) <= 2 * 100 / 64, (probe1, probe2)
    # Training amplifies float-order differences on this tiny random data: compare the first fine-tuning step.
    l1, l2 = ([json.loads(x)["loss"] for x in (d / "finetune" / "metrics.jsonl").read_text().splitlines()]
              for d in (one, two))  # fmt: skip
    assert len(l1) == len(l2) == r1["finetune"]["steps"] == r2["finetune"]["steps"]
    assert abs(l1[0] - l2[0]) < 1e-4 * abs(l1[0]), (l1[0], l2[0])


@pytest.mark.slow
def test_two_processes_give_one_process_fixmatch_steps(tmp_path):
    """FixMatch on 2 processes x half batch: the first steps' loss as on 1 process (alignment over the whole batch)."""
    from tests.eval.test_semi import ARGS as SEMI

    args = ["finetune", *SEMI, "finetune.semi.method=fixmatch", "finetune.semi.mu=2", "finetune.log_every=1",
            "finetune.drop_path_rate=0", "finetune.reprob=0", "finetune.min_steps=2"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert cli_main([*args, "finetune.batch_size=8", f"output_dir={one}"]) == 0
    launch([*args, "finetune.batch_size=4", f"output_dir={two}"], 2, 29610)
    l1, l2 = ([json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(l1) == len(l2) >= 2 and all(abs(a - b) < 1e-4 * abs(a) for a, b in zip(l1[:2], l2[:2], strict=True)), (
        l1,
        l2,
    )
    p1, p2 = ([json.loads(x) for x in (d / "pseudo_labels.jsonl").read_text().splitlines()] for d in (one, two))
    assert p1[0]["mask_rate"] == p2[0]["mask_rate"] and p1[0]["pseudo_accuracy"] == p2[0]["pseudo_accuracy"]
