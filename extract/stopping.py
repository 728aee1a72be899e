"""Clean interruption: SIGINT (Ctrl-C) and SIGTERM (what batch schedulers send before killing a job).

`StopSignals` is installed around a command. Outside a unit of work (loading data, say) a signal stops
the command at once by raising `Interrupted`. Inside one (`with stop.finishing():` around the loop), the
first signal only asks the loop to stop: the loop checks `stop.requested` at its unit boundaries (a video,
an epoch), saves what it did, and the command exits with 128 + the signal number (130 / 143). A second
signal stops at once, as if no handler were installed, keeping whatever was last saved.

Decoding workers (DataLoader processes) ignore both signals (`quiet_worker`): a Ctrl-C reaches every process
of the terminal's group and a scheduler signals every process of the job, but the workers must live until
the main process has finished its unit; they die with it (PR_SET_PDEATHSIG) in any case.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised where a signal stops a command at once (a BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """SIGINT/SIGTERM handlers for one command (installed only in the main thread; a no-op elsewhere)."""

    def __init__(self, on_request: Callable[[int], None] | None = None):
        self.signum: int | None = None
        self.on_request = on_request          # told once, at the first signal inside a unit of work
        self._graceful = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def __call__(self) -> bool:                # usable as a `should_stop` callback
        return self.requested

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None or not self._graceful:
            self.signum = self.signum or signum
            self._restore()                    # a third signal: the default action
            raise Interrupted(signum)
        self.signum = signum
        if self.on_request is not None:
            self.on_request(signum)

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._restore()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def enter_unit(self) -> None:
        """From here a first signal only sets `requested` (the loop finishes its unit and stops)."""
        if self.signum is not None:
            raise Interrupted(self.signum)    # asked to stop before the work began
        self._graceful += 1

    def leave_unit(self) -> None:
        self._graceful = max(0, self._graceful - 1)

    @contextmanager
    def finishing(self) -> Iterator["StopSignals"]:
        """`enter_unit` ... `leave_unit` around a block."""
        self.enter_unit()
        try:
            yield self
        finally:
            self.leave_unit()


def never() -> bool:
    return False


def quiet_worker(parent: int, _worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: ignore SIGINT/SIGTERM (see the module doc) and die with the parent.

    A worker of a killed main process (kill -9) would linger forever, blocked writing decoded frames into a
    pipe nobody reads: the kernel SIGKILLs it when its parent dies (Linux)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
