"""``accelerate launch`` that stops cleanly on SIGTERM (preemption, ``scancel``, ``kill``).

``python -m gmmt.launcher ARGS`` takes exactly the arguments of ``accelerate launch ARGS``.
On SIGTERM torch's launcher forwards the signal to every process it started and waits for
them (30 s, or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, then SIGKILL); each gmmt process then
finishes its step, writes a checkpoint with the others and exits 0. Plain ``accelerate launch``
then ends with a ``SignalException`` traceback and exit code 1; this wrapper prints one line
instead and exits 0 (as a single-process run does on SIGTERM). Other signals (SIGINT, SIGHUP)
are forwarded as they are and exit 128 + the signal number.
"""

import logging
import signal
import sys
from collections.abc import Sequence

# torch's warnings while it forwards the signal; the one line below says the same.
_FORWARDING_NOISE = ("death signal, shutting down workers", "closing signal")


class _DropForwardingNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _FORWARDING_NOISE)


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    args = launch_command_parser().parse_args(argv)
    noise = _DropForwardingNoise()
    for name in ("torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(noise)
    try:
        launch_command(args)
    except SignalException as err:
        return _stopped(signal.Signals(err.sigval))
    except SystemExit as err:
        # accelerate >= 1.16 catches the SignalException itself and exits 128 + the signal.
        if isinstance(err.code, int) and err.code - 128 in _SIGNALS:
            return _stopped(signal.Signals(err.code - 128))
        raise
    return 0


_SIGNALS = {int(s) for s in signal.Signals}


def _stopped(sig: signal.Signals) -> int:
    """One line for a launcher stopped by ``sig``; exit code 0 for SIGTERM, else 128 + n."""
    what = ("its processes were told to write a checkpoint and stop" if sig == signal.SIGTERM
            else f"its processes were sent {sig.name}")  # only SIGTERM checkpoints first
    print(f"gmmt: launcher stopped by {sig.name}: {what}; continue with --resume latest",
          file=sys.stderr)
    return 0 if sig == signal.SIGTERM else 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
