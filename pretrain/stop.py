"""Ctrl-C (SIGINT) and SIGTERM, what a cluster scheduler sends some time before it kills a job, stop a pretraining at
its next optimiser step instead of wherever they land, so that the run can save the step it finished and release its
lock (:meth:`pretrain.train.PretrainRun.run`).

The training process only notes the signal; its loader workers ignore both (a terminal sends Ctrl-C to the whole
process group, a scheduler often SIGTERM too), so that they keep serving the batches the step still needs instead of
dying with a traceback of their own; they end with the training process. A second signal stops at once.

Under torchrun every rank notes the signal, but not necessarily before the same step: torchrun forwards a SIGTERM to
its ranks one after the other, and a rank may be inside a collective when it lands. The ranks therefore agree at each
step on whether any of them was asked to stop (:meth:`StopSignals.agreed`), so that they all stop after the same step
and none waits forever in a collective the others have left. A terminal's Ctrl-C reaches torchrun alone (it starts
its ranks in sessions of their own), which forwards it; a scheduler such as Slurm signals every process of the job,
and torchrun forwards the signal once more: a repeat of the same signal within :data:`SAME_REQUEST_S` is the same
request.

Work that may be dropped, such as the held-out loss and the probe at an epoch's end, runs under
:meth:`StopSignals.cut_short`: a stop asked for there ends it at once (:class:`StopRequested`) rather than after it,
since it can outlast the grace period a scheduler gives between its SIGTERM and its SIGKILL (torchrun's own: 30 s).
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_REQUEST_S = 2.0  # a repeat of the first signal within this many seconds is the same request (torchrun's)


class StopRequested(BaseException):
    """Raised inside :meth:`StopSignals.cut_short` by a stop request; a BaseException, like KeyboardInterrupt, so
    that no library's ``except Exception`` takes it for an error of its own."""


class StopSignals:
    """``with StopSignals() as stop:`` while the block runs, the first SIGINT or SIGTERM sets ``stop.requested`` (the
    signal) instead of ending the process; a second raises :class:`KeyboardInterrupt` (under torchrun, the same signal
    again within :data:`SAME_REQUEST_S` is taken for the first). Outside the main thread (where Python cannot install
    handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[signal.Signals, object] = {}
        self._cutting = False  # inside cut_short()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested, self._at = signal.Signals(signum), time.monotonic()
            if self._cutting:
                raise StopRequested
        elif (signum != self.requested or not dist.is_initialized()  # alone, a second Ctrl-C stops at once
              or time.monotonic() - self._at > SAME_REQUEST_S):
            raise KeyboardInterrupt

    def agreed(self, group: dist.ProcessGroup | None = None) -> signal.Signals | None:
        """The signal any rank of the process ``group`` (default: the whole run) was asked to stop by (SIGTERM before
        SIGINT), or None; a collective on CPU tensors (``group`` must be a gloo group): every rank calls it at the
        same step. Without a process group, this process's own request."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([int(self.requested or 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return signal.Signals(int(flag.item())) if flag.item() else None

    @contextmanager
    def cut_short(self) -> Iterator[None]:
        """``with stop.cut_short():`` a block that a stop request (this process's, made before it or inside it) ends
        at once with :class:`StopRequested`; for work that can be dropped, whose state is restored on the way out."""
        self._cutting = True  # first: a signal that lands just after the look below still ends the block
        try:
            if self.requested is not None:
                raise StopRequested
            yield
        finally:
            self._cutting = False

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
