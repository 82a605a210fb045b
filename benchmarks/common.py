"""Shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``, so this folder is
on ``sys.path``)."""

import os
import platform


def machine() -> str:
    """CPU model and logical core count (``platform.processor()`` is empty on Linux)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} logical cores"
