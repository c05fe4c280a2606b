"""Peak memory of a few training steps, each measurement in its own child process (benchmark internals).

Contract: the parent calls :func:`measure_memory` with the child's command line (a script and its
arguments, run with ``sys.executable``); the child runs under :data:`MALLOC_ENV` (glibc mmaps every
allocation above 64 KiB and returns freed memory at once, so the resident set follows live memory)
and calls :func:`memory_child` with a ``run(on_step)`` callable that trains ``warmup + steps``
steps, calls ``on_step(i)`` after step i (0-based) and returns a dict with ``samples_per_s``.
:func:`memory_child` takes the baseline after the warm-up steps and the peak over the following
ones and prints one line ``MEMORY {json}`` (``mode``, ``peak_bytes``, ``base_bytes``,
``delta_bytes``, ``method``, ``steps``, ``samples_per_s``), which :func:`measure_memory` returns
as a dict (it raises ``RuntimeError`` with the child's stderr when there is no such line).
On CPU: ``VmHWM`` from ``/proc/self/status``, reset through ``/proc/self/clear_refs`` (else
``ru_maxrss``), minus ``VmRSS`` after warm-up; on CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


# glibc: give every allocation above 64 KiB its own mmap and return freed memory at once, so that the
# resident set follows live (tensor) memory instead of what the allocator keeps cached
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_TOP_PAD_": "0",
              "MALLOC_ARENA_MAX": "2"}


def memory_child(mode: str, run: Callable[[Callable[[int], None]], dict], *, device: str, warmup: int,
                 steps: int) -> int:
    """Run one mode (``run(on_step)``: ``warmup + steps`` steps) and print its peak memory as one JSON
    line (``MEMORY {...}``).

    The baseline is taken after the warm-up steps (library first-call initialisation, optimizer
    state and the first batches are then in place), the peak over the following steps."""
    import resource

    import torch

    mark: dict = {}

    def on_step(i: int) -> None:
        if i != warmup - 1:
            return
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            mark["base"] = torch.cuda.memory_allocated()
            mark["method"] = "torch.cuda.max_memory_allocated over the timed steps - allocated after warm-up"
            return
        mark["base"] = (_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            mark["method"] = ("peak VmHWM over the timed steps - VmRSS after warm-up, main process, glibc "
                              "allocations > 64 KiB mmapped and freed at once (" +
                              " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + ")")
        except OSError:
            mark["method"] = "ru_maxrss - VmRSS after warm-up, main process (the peak may predate the steps)"

    stats = run(on_step)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    elif "VmHWM" in mark["method"]:
        peak = (_status_kb("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("MEMORY " + json.dumps({"mode": mode, "peak_bytes": peak, "base_bytes": mark["base"],
                                  "delta_bytes": peak - mark["base"], "method": mark["method"],
                                  "steps": steps, "samples_per_s": stats["samples_per_s"]}))
    return 0


def measure_memory(argv: list[str], *, name: str, timeout: float) -> dict:
    """Run ``python *argv`` (a script that calls :func:`memory_child`) under :data:`MALLOC_ENV`;
    return its ``MEMORY`` line as a dict (``name`` labels the error when there is none)."""
    cmd = [sys.executable] + argv
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **MALLOC_ENV})
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory run of {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
