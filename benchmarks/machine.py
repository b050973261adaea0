"""What every benchmark records beside its figures: the machine and versions, and one way to write the JSON."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def machine_facts() -> dict[str, Any]:
    """Date, CPU model, AMX or not (bf16 speed depends on it), torch threads, GPU name, torch version."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if platform.system() == "Linux" else ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), None)
    return {
        "date": time.strftime("%Y-%m-%d"), "cpu": model or platform.processor() or platform.machine(),
        "amx": "amx" in lscpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }  # fmt: skip


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """``report`` as indented JSON at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def publish(path: str | Path, rows: list[dict[str, Any]], table: str, **env: Any) -> Path:
    """Write ``{"env", "results"}`` to ``path`` (the machine's facts plus ``env``), print the env and ``table``."""
    facts = {**machine_facts(), **env}
    out = write_report(path, {"env": facts, "results": rows})
    print(f"env: {facts}")
    print(table)
    print(f"wrote {out}")
    return out
