"""Stopping cleanly on Ctrl-C and SIGTERM (what SLURM, `timeout` and `docker stop` send).

A signal raises ``Interrupted`` (a KeyboardInterrupt), so the training loop saves a checkpoint
and every ``with`` block (the run folder's lock) unwinds. Processes that run several jobs (the
sweep's) *defer* signals between jobs: the signal is only recorded, the running job still stops
at its next step, and the jobs not yet started see ``requested()`` and do not start. Every signal
is recorded, so a job stopped mid-training also keeps the next one from starting.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``signum`` says which (exit code 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_requested: int | None = None
_deferring = 0


def _handle(signum, frame):  # noqa: ARG001 - the signal module's signature
    global _requested
    _requested = signum  # recorded either way: the jobs after this one in the process must not start
    if not _deferring:
        raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM through dynbert (main thread only; elsewhere a no-op).

    A handler someone else installed (submitit's, which requeues the job itself) is left alone, and
    so is an ignored signal: a job a script starts in the background (`cmd &`) inherits SIGINT
    ignored, so that Ctrl-C at the terminal does not stop it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler, _handle):
            signal.signal(signum, _handle)


def requested() -> int | None:
    """The stop signal this process received, if any (it stays: later jobs must not start)."""
    return _requested


@contextlib.contextmanager
def deferred():
    """Inside, a stop signal is only recorded (``requested()``), never raised."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextlib.contextmanager
def raising():
    """Inside, a stop signal raises ``Interrupted``; one recorded earlier raises on entry."""
    global _deferring
    saved, _deferring = _deferring, 0
    try:
        if _requested is not None:
            raise Interrupted(_requested)
        yield
    finally:
        _deferring = saved
