"""How every ``mpp`` training command ends: its result, or one line on stderr and an exit code.

Exit codes: 0 done, 2 bad input (config, files, paths, a full disk; nothing is lost), 3 the loss diverged (the last
good checkpoint is kept).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mpp.checkpoint import CheckpointError
from mpp.config import ConfigError, to_dict
from mpp.engine import NonFiniteLossError
from mpp.runtime import one_line


def run_command(prog: str, build: Callable[[], Any], run: Callable[[Any], Any], print_config: bool = False) -> int:
    """Build the config (``build``), then print it or ``run`` it; errors become one line and an exit code."""
    try:
        config = build()
        if print_config:
            import yaml

            print(yaml.safe_dump(to_dict(config), sort_keys=False))
            return 0
        run(config)
    except (ConfigError, ValueError, CheckpointError, OSError) as err:  # OSError: full disk, unusable output_dir
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3
    return 0
