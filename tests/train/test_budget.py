"""Wall-clock budgets: the step count from the first steps' pace (faked clock), kept on resume; the monitor's share."""

import yaml
from accelerate import Accelerator

from mpp.train import engine, pretrain
from mpp.train.budget import MARGIN, RECHECK_SHARE, STATE_KEY, TIMED_STEPS, UNTIMED_STEPS, steps_in_budget
from mpp.train.checkpoint import TrainState
from mpp.train.engine import FitHooks, _pacer
from mpp.train.monitor import MonitorRun, readings_cadence
from mpp.train.optim import MAX_WARMUP_SHARE, Schedule
from tests.pretrain_runs import tiny_config


def _schedule(minutes: float | None = 2.0) -> Schedule:
    return Schedule(32, 1, 1, 1e-3, 1e-3, False, 0.0, 1_000_000, 1.0, 50, minutes=minutes)


class Bar:
    total = 0


def test_budget_fixes_the_steps_from_the_timed_pace_and_a_resume_keeps_them():
    now = [0.0]
    schedule, state, plans, paces = _schedule(), TrainState(), [], []

    def on_pace(seconds: float, s: Schedule) -> float:
        paces.append(seconds)
        return 5.0  # the stage's monitor: 5 s per epoch of 50 steps

    hooks = FitHooks(on_pace=on_pace, on_plan=plans.append)
    pace = _pacer(Accelerator(cpu=True), schedule, state, hooks, Bar(), None, started=-10.0, clock=lambda: now[0])
    for step in range(1, UNTIMED_STEPS + TIMED_STEPS + 1):
        now[0] = 0.5 * step  # 0.5 s per step
        pace(step)
    assert paces == [0.5]
    left = 120 * (1 - MARGIN) - (now[0] + 10.0)  # spent since the run started (data, model, first reading)
    expected = UNTIMED_STEPS + TIMED_STEPS + int(left // (0.5 + 5.0 / 50))
    assert schedule.total_steps == expected == plans[0].total_steps == state.extra[STATE_KEY]["total_steps"]
    assert schedule.epochs == -(-expected // 50) and abs(schedule.span_epochs - expected / 50) < 1e-9
    assert schedule.lr_at(schedule.span_epochs) == 0.0  # the cosine ends where the budget does
    assert expected < 200 and schedule.warmup_epochs == MAX_WARMUP_SHARE * expected / 50  # 1 epoch = 50 steps: cut
    assert steps_in_budget(1.0, 100.0, 7, 0.5, 50, 0.0) == 8  # an exhausted budget still takes one more step
    planned = dict(state.extra[STATE_KEY])

    # Once RECHECK_SHARE of the steps are done, their real pace (here 0.75 s/step, not 0.6) re-fixes the count.
    timed_end, timed_at = UNTIMED_STEPS + TIMED_STEPS, now[0]
    recheck = timed_end + max(TIMED_STEPS, round(RECHECK_SHARE * (expected - timed_end)))
    for step in range(timed_end + 1, recheck + 1):
        now[0] = timed_at + 0.75 * (step - timed_end)
        pace(step)
    left = 120 * (1 - MARGIN) - (now[0] + 10.0)
    assert schedule.total_steps == recheck + int(left // 0.75) == state.extra[STATE_KEY]["total_steps"] < expected
    assert state.extra[STATE_KEY]["recheck_step"] == recheck and len(plans) == 2
    assert schedule.lr_at(schedule.span_epochs) == 0.0
    now[0] += 1000.0
    pace(recheck + 1)  # one re-check only
    assert len(plans) == 2
    state.extra[STATE_KEY] = planned

    resumed = _schedule()  # a resume restores the count and times nothing, whatever the pace now
    assert _pacer(Accelerator(cpu=True), resumed, TrainState(extra=dict(state.extra)), FitHooks(), Bar(), None,
                  started=0.0, clock=lambda: 1e9) is None  # fmt: skip
    assert resumed.total_steps == expected and resumed.warmup_epochs == schedule.warmup_epochs


def test_monitor_cadence_keeps_its_share():
    assert readings_cadence(1.0, 100.0, 0.05) == 1  # 1% of an epoch: every epoch
    assert readings_cadence(10.0, 10.0, 0.05) == 19  # as long as an epoch: every 19th keeps it at 5%
    run = MonitorRun(object(), None, 10, "avg", reading_s=4.0, say=lambda s: None)  # type: ignore[arg-type]
    extra = run.pace(0.1, _schedule(None))  # 50 steps of 0.1 s: 5 s epochs
    assert run.every_epochs == 16 and abs(extra - 4.0 / 16) < 1e-9
    assert 4.0 / (16 * 5.0 + 4.0) <= 0.05
    fixed = MonitorRun(object(), 3, 10, "avg", reading_s=4.0)  # type: ignore[arg-type]
    assert fixed.pace(0.1, _schedule(None)) == 4.0 / 3 and fixed.every_epochs == 3


def test_budgeted_pretraining_records_its_steps_and_resumes_to_the_same_count(tmp_path, monkeypatch):
    out = tmp_path / "run"
    budget = ["optim.minutes=5", "log_every=5", "checkpoint_every_steps=20"]
    monkeypatch.setattr(engine, "steps_in_budget", lambda *args: 30)  # the arithmetic is tested above, not the clock
    pretrain.run(tiny_config(out, *budget, "stop_at_step=20"))
    planned = yaml.safe_load((out / "config.yaml").read_text())["_run"]["budget"]["total_steps"]
    assert planned == 30
    monkeypatch.setattr(engine, "steps_in_budget", lambda *args: 31)  # a resume that timed again would plan 31
    pretrain.run(tiny_config(out, *budget))  # the same command again resumes
    records = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("stage") == "pretrain"]
    assert max(steps) == planned and (out / "encoder.safetensors").is_file()
