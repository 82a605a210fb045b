"""Shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``, so this folder is
on ``sys.path``)."""

import argparse
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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, also for options without a help text (the
    stock formatter appends defaults to existing help texts only)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text.strip()
