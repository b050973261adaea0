"""The engine's switches on CPU: fused and per-tensor AdamW agree, the loss is read from the device only at log
steps and checkpoints (a NaN still never reaches a checkpoint), and the schedule prologue names bad batches."""

import pytest
import torch

import mpp.train.pretrain as pretrain
from mpp.config import ConfigError, OptimConfig, PretrainConfig, build_config
from mpp.runtime import NonFiniteLossError
from mpp.train.checkpoint import checkpoint_dirs, read_checkpoint
from mpp.train.engine import LossWindow, StepInfo
from mpp.train.optim import plan_schedule, pretrain_optimizer

TINY = [
    "model.name=mae_vit_micro_patch4", "data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", "optim.blr=1e-3", "mixed_precision=fp32",
    "progress=false", "viz_samples=2", "monitor.enabled=false",
]  # fmt: skip


def test_fused_and_per_tensor_adamw_agree():
    torch.manual_seed(0)
    models = [pretrain.build_mae(build_config(PretrainConfig, None, TINY)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [pretrain_optimizer(m, 1e-3, 0.05, (0.9, 0.95), fused=f) for m, f in zip(models, (False, True), strict=True)]
    imgs, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    for _ in range(5):  # the same gradients into both: only the optimiser arithmetic may differ
        for opt in opts:
            opt.zero_grad()
        models[0](imgs, noise=noise).loss.backward()
        for p, q in zip(*params, strict=True):
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    a, b = (m.state_dict() for m in models)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_loss_window_reads_once_and_names_the_steps():
    from accelerate import Accelerator

    window = LossWindow(Accelerator(cpu=True))
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        window.add(StepInfo(step, 0.0, torch.tensor(value), 0.1, 8))
    assert window.read(3) == pytest.approx(2.0) and window.read(3) is None
    window.add(StepInfo(4, 0.0, torch.tensor(float("nan")), 0.1, 8))
    window.add(StepInfo(5, 0.0, torch.tensor(1.0), 0.1, 8))
    with pytest.raises(NonFiniteLossError, match="in steps 4-5"):
        window.read(5)


def test_nan_between_log_steps_never_reaches_a_checkpoint(tmp_path, nan_loss, capsys):
    out = tmp_path / "run"
    nan_loss(5, once=True)
    code = pretrain.main([*TINY, f"output_dir={out}", "log_every=4", "checkpoint_every_steps=3"])
    assert code == 3 and "in steps 5-6" in capsys.readouterr().err  # read before the step-6 checkpoint
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000003"]
    assert all(torch.isfinite(v).all() for v in read_checkpoint(checkpoint_dirs(out)[0]).model_state.values())


def test_schedule_prologue():
    section = OptimConfig(epochs=2, batch_size=8, accum_steps=2, blr=1e-3, warmup_epochs=1)
    plan = plan_schedule(section, 100, 2, "optim")
    assert (plan.effective_batch, plan.steps_per_epoch, plan.total_steps) == (32, 3, 6)
    assert plan.lr == pytest.approx(1e-3 * 32 / 256) and plan.micro_batches_per_epoch == 6
    few = plan_schedule(OptimConfig(epochs=1, batch_size=64, min_steps=30, warmup_epochs=0.5), 40, 1, "optim",
                        clip_batch=True)  # fmt: skip
    assert few.batch_size == 40 and few.batch_clipped and few.epochs == 30 and few.warmup_epochs == 15
    # the same few labels on a wall-clock budget: warmup stays half of the run the budget fixes, not half a step
    budgeted = OptimConfig(epochs=1, batch_size=40, min_steps=30, warmup_epochs=0.5, minutes=5)
    timed = plan_schedule(budgeted, 40, 1, "optim")
    timed.cap(172)
    assert timed.total_steps == 172 and timed.warmup_epochs == pytest.approx(86)
    with pytest.raises(ConfigError, match="optim.batch_size=64: 40 images give no full step"):
        plan_schedule(OptimConfig(batch_size=64), 40, 1, "optim")


def test_every_attention_layer_dispatches_to_sdpa():
    """timm's blocks call F.scaled_dot_product_attention (flash / memory-efficient kernels on a GPU) unless
    TIMM_FUSED_ATTN=0; mpp's encoder and decoder must not fall back to the explicit softmax(QK^T)V path."""
    from timm.layers import Attention

    model = pretrain.build_mae(build_config(PretrainConfig, None, TINY))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 3 and all(layer.fused_attn for layer in layers)  # micro: 2 encoder + 1 decoder blocks


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "mae.safetensors"))


@pytest.mark.slow
def test_compiled_pretraining_matches_eager_and_a_broken_compiler_falls_back(tmp_path, capsys):
    short = [*TINY, "data.synthetic_size=32"]  # 4 steps
    assert pretrain.main([*short, f"output_dir={tmp_path / 'eager'}"]) == 0  # compile unset: eager on a CPU, says why
    assert "torch.compile: off on the CPU (measured" in capsys.readouterr().out
    # aot_eager traces the model into a graph through AOTAutograd (what inductor compiles) without generating code.
    assert pretrain.main([*short, f"output_dir={tmp_path / 'aot'}", "compile=true", "compile_backend=aot_eager"]) == 0
    assert "torch.compile (aot_eager): compiled" in capsys.readouterr().out
    assert pretrain.main([*short, f"output_dir={tmp_path / 'bad'}", "compile=true", "compile_backend=no_such"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile (no_such) failed, training without it" in out
    eager, aot, bad = (_final_weights(tmp_path / name) for name in ("eager", "aot", "bad"))
    assert all(torch.equal(eager[k], bad[k]) for k in eager)  # the trial step left no trace
    assert max((eager[k] - aot[k]).abs().max().item() for k in eager) < 1e-5
