"""SIGTERM (and SIGINT, SIGUSR1) end a run after the current step with a checkpoint, one line and exit 128 + signal."""

import json
import os
import signal
import subprocess
import sys
import time

from mpp.train import pretrain
from mpp.train.checkpoint import latest_checkpoint, read_checkpoint
from mpp.train.signals import StopSignals
from tests.pretrain_runs import TINY, tiny_config


def test_the_first_signal_waits_for_the_step():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1  # held, not acted on: the engine stops after the step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_sigterm_checkpoints_and_the_run_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mpp", "pretrain", *TINY, "optim.epochs=500", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"stage": "pretrain"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("mpp pretrain: stopped by SIGTERM after step ") and "run the same command again" in last
    step = int(last.split("after step ")[1].split(":")[0])
    saved = read_checkpoint(latest_checkpoint(out)).trainer_state
    assert saved["step"] == step and "Traceback" not in err
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"pretrain"' in x]
    assert max(logged) <= step
    pretrain.run(tiny_config(out, "optim.epochs=500", f"stop_at_step={step + 2}"))  # continues from there
    assert read_checkpoint(latest_checkpoint(out)).trainer_state["step"] == step + 2
