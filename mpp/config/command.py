"""The command line every ``mpp`` training and evaluation command shares, and how it becomes a run.

``mpp <command> [INIT] [--recipe YAML] [--resume RUN_DIR] [--print-config] [key=value ...]``: the config is built by
:func:`mpp.config.build_config` (``--resume``: from the saved settings of that run), then printed or run by
:func:`mpp.runtime.run_command`, which turns bad input into one line and an exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mpp.config.core import build_config, settings_to_resume
from mpp.runtime import run_command

INIT_HELP = "INIT (or init=...) is a pretraining run dir, an encoder.safetensors, a checkpoint, or 'random'."


def parse_command_line(prog: str, description: str, argv: list[str] | None, takes_init: bool) -> argparse.Namespace:
    """``--recipe``, ``--resume``, ``--print-config``, dotted ``key=value`` overrides, and an ``INIT``.

    With ``takes_init`` at most one bare ``INIT`` argument is taken (``args.init``; ``None`` without one).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{description} Settings: defaults <- --recipe YAML <- key=value overrides (dotted keys)."
        + (f" {INIT_HELP}" if takes_init else ""),
    )
    parser.add_argument("--recipe", help="YAML recipe stating what differs from the defaults")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the stopped run in RUN_DIR (its saved settings)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    what = "INIT | key=value" if takes_init else "key=value"
    parser.add_argument("args", nargs="*", metavar=what, help="dotted overrides, e.g. optim.blr=1.5e-4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --recipe
    args.overrides = [a for a in args.args if "=" in a]
    bare = [a for a in args.args if "=" not in a]
    if bare and not takes_init:
        parser.error(f"unexpected argument(s) {bare}; overrides look like key=value")
    if len(bare) > 1:
        parser.error(f"at most one INIT argument, got {bare}; overrides look like key=value")
    args.init = bare[0] if bare else None
    return args


def resolve_command_config(cls: type, args: argparse.Namespace) -> Any:
    """The command's config from its parsed command line (``--resume``: the saved settings of that run)."""
    base = settings_to_resume(args.resume, args.recipe) if args.resume else None
    if base is None and not args.recipe and getattr(cls, "derives_settings", False):
        from mpp.config.rules import rule_settings

        base = rule_settings(args.overrides)  # no recipe: settings from the data's fingerprint (or None)
    return build_config(cls, None if base is not None else args.recipe, args.overrides, base=base, init=args.init)


def command_main(
    prog: str, cls: type, description: str, run: Callable[[Any], Any], argv: list[str] | None, takes_init: bool = True
) -> int:
    """Parse, build the config, run; bad input is a one-line error (exit 2), a diverging loss exit 3."""
    from mpp.train.lock import locks_released_after

    args = parse_command_line(prog, description, argv, takes_init)
    with locks_released_after():  # the run directory's lock, however the command ends
        return run_command(prog, lambda: resolve_command_config(cls, args), run, args.print_config)
