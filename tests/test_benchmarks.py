"""The step benchmark's CPU path runs end to end on a micro model; its three implementations compute one loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pretrain_step  # noqa: E402


def test_step_benchmark_cpu_path_without_the_official_checkout(tmp_path, capsys):
    out = tmp_path / "step.json"
    bench_pretrain_step.main(["--cases", "micro_16px", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["notes"][0] == "official: skipped (no --official DIR)" and row["notes"][1].startswith("mpp auto: ")
    assert set(row["images_per_s"]) == {"mpp", "hf", "mpp auto"} and row["auto"]["precision"] in ("fp32", "bf16")
    assert row["loss_max_abs_diff"] < 1e-5 and row["loss"]["mpp"] > 0
    assert "| micro_16px | 8 | fp32 |" in capsys.readouterr().out and report["env"]["device"] == "cpu"


def test_official_dir_must_be_a_mae_checkout(tmp_path):
    with pytest.raises(SystemExit, match="models_mae.py not found"):
        bench_pretrain_step.load_official(tmp_path)


def test_compile_benchmark_reports_a_break_even(tmp_path, capsys):
    import bench_compile

    out = tmp_path / "compile.json"
    # backend "eager" traces with dynamo but generates no code: the script's path in seconds, not a speed figure
    bench_compile.main(["--cases", "micro_16px", "--repeats", "2", "--backend", "eager", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert abs(row["loss_eager"] - row["loss_compiled"]) < 1e-5 and row["eager_step_s"] > 0
    assert row["break_even_steps"] is None or row["break_even_steps"] > 0
    assert "| micro_16px | 8 | fp32 |" in capsys.readouterr().out
