"""Stopping cleanly on Ctrl-C and SIGTERM (what SLURM, `timeout` and `docker stop` send).

A signal raises ``Interrupted`` (a KeyboardInterrupt), so every ``with`` block (the run folder's
lock) unwinds. Inside ``deferred()`` the signal is only recorded: the training loop defers it and
acts on it between optimizer steps, where model, optimizer, scheduler, random state and step form
one consistent checkpoint; processes that run several jobs (the sweep's) defer it between jobs, so
the running job still stops at its next step and the jobs not yet started see ``requested()`` and do
not start. Every signal is recorded, so a job stopped mid-training also keeps the next one from
starting. ``end_with_parent`` turns the death of the parent process (``kill -9``, an out-of-memory
kill) into the same stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

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


def end_with_parent(group: bool = False, parent: int | None = None, interval: float = 1.0) -> None:
    """Stop this process (``group``: its whole process group) with SIGTERM once its parent is gone.

    `dynbert sweep` runs its jobs in a process group of their own, so that it can pass Ctrl-C on
    to them; but a parent killed with SIGKILL (or by the out-of-memory killer) can pass nothing,
    and its jobs would train on in the background. A parent's death is seen the same way on every
    POSIX system: the child is handed to another parent, so ``os.getppid()`` changes. Polled by a
    daemon thread once a second; the first call in a process wins. ``parent``: the pid the parent
    had, when it is known (a parent that died before this call is then seen too).
    """
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        if group:
            os.killpg(os.getpgrp(), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dynbert-parent-watch", daemon=True).start()


_watching = False
