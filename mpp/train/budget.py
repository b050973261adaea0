"""Runs sized to a wall-clock budget (``optim.minutes``, ``finetune.minutes``): the step count from the measured pace.

A run with a budget starts on a provisional, very long schedule. Its first :data:`UNTIMED_STEPS` optimiser steps
are not timed (allocator, caches, loader start-up), the next :data:`TIMED_STEPS` are; from their pace the run fixes
its total step count, so that warmup + cosine end when the budget does (:meth:`Schedule.cap`). The pace of the first
steps can be off (a small model's steps slowed ~20% after them on an EPYC: a 5-minute run took 5.84), so once
:data:`RECHECK_SHARE` of the planned steps are done the run compares the time they really took, monitor included,
with the plan and re-fixes the count from that ratio: the cosine is stretched or shrunk from there. The budget counts
from the run's start (model, data and the random-init monitor reading included) and covers the training steps, the
monitor readings (their cost per epoch comes from the stage, see :class:`BudgetPlan`) and a :data:`MARGIN` for
checkpoints and pictures. The decision is stored in the trainer state, so a resumed run keeps the same step count
(one resumed before the re-check keeps the first count: the time before the restart is not known).
Warmup is counted in epochs and ends after the timing window on any sensible run, so the lr of the timed steps is
the lr of the final schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

UNTIMED_STEPS = 2
TIMED_STEPS = 10
RECHECK_SHARE = 0.25  # share of the planned steps after which the real pace re-fixes the count
MARGIN = 0.03  # share of the budget kept for checkpoints, pictures and the pace drifting
STATE_KEY = "budget"  # TrainState.extra[STATE_KEY]: the decision a resume keeps


@dataclass
class BudgetPlan:
    """The step count a budget allows, and the arithmetic behind it (recorded in config.yaml and the state)."""

    minutes: float
    seconds_per_step: float
    elapsed_s: float  # spent when the pace was known
    extra_s_per_epoch: float  # monitor readings per epoch (the stage's estimate)
    total_steps: int
    # The re-check (None before it): the step it ran at, and the real seconds per step (monitor included) until then.
    recheck_step: int | None = None
    rechecked_s_per_step: float | None = None
    warmup_epochs: float | None = None  # as the first plan left it; the re-check and a resume keep it

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def describe(self, steps_per_epoch: int) -> str:
        """One console line."""
        extra = f" + {self.extra_s_per_epoch:.1f} s/epoch of monitor" if self.extra_s_per_epoch else ""
        return (
            f"  budget {self.minutes:g} min: {self.seconds_per_step * 1000:.0f} ms/step{extra}, {self.elapsed_s:.0f} s "
            f"spent -> {self.total_steps} steps ({self.total_steps / steps_per_epoch:.2f} epochs), "
            f"{100 * MARGIN:.0f}% kept for checkpoints and pictures"
        )

    def per_step_s(self, steps_per_epoch: int) -> float:
        """Planned seconds per optimiser step, the monitor's share included."""
        return self.seconds_per_step + self.extra_s_per_epoch / max(steps_per_epoch, 1)

    def recheck_at(self, steps_done: int) -> int | None:
        """The step of the re-check, for a plan made after ``steps_done`` steps (``None``: too short to need one)."""
        at = steps_done + max(TIMED_STEPS, round(RECHECK_SHARE * (self.total_steps - steps_done)))
        return at if at < self.total_steps - 1 else None

    def recheck(self, step: int, since_plan_s: float, elapsed_s: float, steps_per_epoch: int, planned_at: int) -> None:
        """Re-fix ``total_steps`` at ``step`` from the real time of the steps since the plan (made at ``planned_at``).

        Args:
            step: steps done now.
            since_plan_s: seconds those ``step - planned_at`` steps really took, monitor readings included.
            elapsed_s: seconds spent since the run started.
            steps_per_epoch: optimiser steps per epoch.
            planned_at: steps done when the plan was made.
        """
        real = since_plan_s / max(step - planned_at, 1)
        self.recheck_step, self.rechecked_s_per_step = step, real
        self.total_steps = steps_in_budget(self.minutes, elapsed_s, step, real, steps_per_epoch, 0.0)

    def describe_recheck(self, steps_per_epoch: int) -> str:
        """One console line for the re-check."""
        assert self.rechecked_s_per_step is not None
        return (
            f"  budget re-checked at step {self.recheck_step}: {self.rechecked_s_per_step * 1000:.0f} ms/step really "
            f"(planned {self.per_step_s(steps_per_epoch) * 1000:.0f}) -> {self.total_steps} steps"
        )


def steps_in_budget(
    minutes: float, elapsed_s: float, done_steps: int, seconds_per_step: float, steps_per_epoch: int, extra_s: float
) -> int:
    """Total optimiser steps (at least ``done_steps + 1``) that fill what is left of ``minutes``.

    Args:
        minutes: the budget.
        elapsed_s: seconds already spent.
        done_steps: steps already done.
        seconds_per_step: the measured pace.
        steps_per_epoch: optimiser steps per epoch.
        extra_s: other seconds spent per epoch (monitor readings).
    """
    left = minutes * 60 * (1 - MARGIN) - elapsed_s
    per_step = seconds_per_step + extra_s / max(steps_per_epoch, 1)
    return done_steps + max(1, math.floor(left / per_step))


class StepTimer:
    """Times optimiser steps ``first + UNTIMED_STEPS`` to ``first + UNTIMED_STEPS + TIMED_STEPS``; then the pace."""

    def __init__(self, first_step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.start_at, self.end_at = first_step + UNTIMED_STEPS, first_step + UNTIMED_STEPS + TIMED_STEPS
        self.clock = clock
        self.t0: float | None = None

    def tick(self, step: int) -> float | None:
        """Call after each optimiser step; the seconds per step once the timed window ends, else ``None``."""
        if step == self.start_at:
            self.t0 = self.clock()
        elif step == self.end_at and self.t0 is not None:
            return (self.clock() - self.t0) / TIMED_STEPS
        return None
