"""Ctrl-C (SIGINT) and SIGTERM, what a cluster scheduler sends some time before it kills a job, stop a pretraining at
its next optimiser step instead of wherever they land, so that the run can save the step it finished and release its
lock (:meth:`pretrain.train.PretrainRun.run`).

The training process only notes the signal; its loader workers ignore both (a terminal sends Ctrl-C to the whole
process group, a scheduler often SIGTERM too), so that they keep serving the batches the step still needs instead of
dying with a traceback of their own; they end with the training process. A second signal stops at once.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals() as stop:`` while the block runs, the first SIGINT or SIGTERM sets ``stop.requested`` (the
    signal) instead of ending the process; a second raises :class:`KeyboardInterrupt`. Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def ignore_stop_signals() -> None:
    """In a loader worker: leave SIGINT and SIGTERM to the training process, which ends the workers itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
