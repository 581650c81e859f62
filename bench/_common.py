"""What every benchmark script shares: the machine line and writing the JSON result."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def save(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kb(reset_ok: bool) -> int:
    """The peak RSS since reset_peak(); ru_maxrss (the process's lifetime peak) if it could not reset."""
    import resource

    hwm = status_kb("VmHWM") if reset_ok else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class StepTimer(TrainerCallback):
    """Each optimizer step's seconds, from step begin to step end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)
