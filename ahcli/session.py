"""What a long command (extract, train-heads, finetune, ensemble, ablate) needs besides its options, for the
places the real work runs: batch jobs whose output goes to a file, schedulers that send SIGTERM.

- Progress without a terminal: rich bars only on a terminal; otherwise a plain line every `--log-every`
  seconds (done/total, rate, ETA), and every epoch for training.
- A log file in the folder the command writes (CACHE/logs/extract-<time>.log, RUN/train.log, ...): the
  command line, the same progress lines (timestamped, at the same interval, terminal or not), the summary,
  the error or interruption line. Lines said before the folder exists are kept and written once it does.
- Clean interruption (extract/stopping.py): SIGINT/SIGTERM finish or checkpoint the current unit, then one
  line says what was saved and the exact command that resumes; exit 130 / 143.
"""
from __future__ import annotations

import errno
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional

import typer
from rich.console import Console
from rich.markup import escape

from extract.errors import AHError
from extract.stopping import Interrupted, StopSignals, signal_name

OPT_LOG_EVERY = typer.Option(
    30.0, "--log-every", min=0.0, help="Seconds between plain progress lines (done/total, rate, ETA) when the "
    "output is not a terminal, e.g. a batch job's `> log 2>&1`; the folder's log file gets them too. 0: every unit.")
STAMP = "%Y%m%d-%H%M%S"

_active: Optional["Session"] = None
_last: tuple[str, int] | None = None       # the line a session ended with, for the top-level handler


def active() -> Optional["Session"]:
    """The running command's session, if any."""
    return _active


def last_failure() -> tuple[str, int] | None:
    """The failure line (and status) the last session ended with, once (the top-level handler prints it)."""
    global _last
    line, _last = _last, None
    return line


def command_line(extra: tuple[str, ...] = ()) -> str:
    """The command as typed (as `ahcli ...`), with `extra` flags appended when missing."""
    args = list(sys.argv[1:]) + [a for a in extra if a not in sys.argv[1:]]
    return shlex.join(["ahcli", *args])


def failure_line(exc: BaseException) -> tuple[str, int] | None:
    """The one line (and exit status) a command ends with when `exc` escapes it; None for a normal exit."""
    if isinstance(exc, AHError):
        return f"error: {exc}", exc.exit_code
    resume = _active.resume if _active is not None else command_line()
    if isinstance(exc, Interrupted):   # outside a unit of work (loading, say), or a second signal
        return (f"interrupted by {signal_name(exc.signum)}: stopped at once (what was saved before is kept); "
                f"resume with: {resume}", exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted by SIGINT; resume with: {resume}", 130
    if isinstance(exc, OSError):
        return os_error_line(exc), 1
    if isinstance(exc, UNEXPECTED):
        return (f"error: {type(exc).__name__}: {exc} (an input this program did not expect; rerun with "
                f"{DEBUG_ENV}=1 for the traceback and report it with the command)", 1)
    return None


# Programming-level failures that escape a command: one line at the CLI (the traceback with AH_DEBUG=1).
UNEXPECTED = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RuntimeError)
DEBUG_ENV = "AH_DEBUG"


def os_error_line(exc: OSError) -> str:
    """One line for a file-system failure: the path, what the system said, and what to do for the usual ones."""
    where = f"{exc.filename}: " if exc.filename else ""
    hint = {errno.ENOSPC: "; free some space and rerun the same command (finished work is kept)",
            errno.EACCES: "; check the folder's permissions", errno.EROFS: "; the file system is read-only",
            errno.EDQUOT: "; over the disk quota"}.get(exc.errno or 0, "")
    return f"error: {where}{exc.strerror or exc}{hint}"


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Session:
    """One command's console output, log file, progress pacing and stop signals (a context manager)."""

    def __init__(self, name: str, log_every: float = 30.0, console: Console | None = None):
        self.name = name
        self.log_every = float(log_every)
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and sys.stderr.isatty()   # rich bars; else plain lines
        self.stop = StopSignals(on_request=self._announce)
        self.log_path: Path | None = None
        self.resume = command_line()          # the command that continues after an interruption
        self.quiet = False                    # no progress lines on the console (the log still gets them)
        self._fh: IO[str] | None = None
        self._pending: list[str] = []

    # -- lifetime
    def __enter__(self) -> "Session":
        global _active
        _active = self
        self.log(f"$ {command_line()}")
        self.stop.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _active, _last
        line = failure_line(exc) if exc is not None else None
        if line is not None:
            self.log(line[0])
            _last = line
        self.stop.uninstall()
        _active = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    # -- the log file
    def attach(self, path: Path) -> Path:
        """Start the log file (appending) and write what was said so far."""
        if self._fh is None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8", buffering=1)
            self.log_path = path
            for line in self._pending:
                self._fh.write(line)
            self._pending.clear()
        return self.log_path

    def attach_stamped(self, folder: Path, prefix: str, suffix: str = "") -> Path:
        return self.attach(Path(folder) / f"{prefix}-{time.strftime(STAMP)}{suffix}.log")

    def log(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n"
        if self._fh is not None:
            self._fh.write(line)
        else:
            self._pending.append(line)

    # -- saying things
    def say(self, text: str, style: str | None = None, console: Console | None = None) -> None:
        """A line on the console (markup-free) and in the log."""
        (console or self.console).print(escape(text), style=style, highlight=False, soft_wrap=True)
        self.log(text)

    def progress(self, text: str) -> None:
        """A plain progress line: printed when there is no live bar to show it (and progress is not turned
        off: `quiet`), always logged."""
        if not self.live and not self.quiet:
            self.console.print(escape(text), highlight=False, soft_wrap=True)
        self.log(text)

    def ticker(self, label: str, unit: str) -> "Ticker":
        return Ticker(self, label, unit)

    # -- interruption
    def _announce(self, signum: int) -> None:
        self.say(f"{signal_name(signum)} received: finishing the current unit of work, then stopping "
                 "(send it again to stop at once)", style="yellow")

    def interrupted(self, saved: str, resume: str) -> typer.Exit:
        """The one line of a clean interruption; raise the returned Exit (130 for SIGINT, 143 for SIGTERM)."""
        self.say(f"interrupted by {signal_name(self.stop.signum or 2)}: {saved}; resume with: {resume}",
                 style="yellow")
        return typer.Exit(self.stop.exit_code)


class Ticker:
    """Paced progress lines: the first at once, then at most one per `log_every` seconds."""

    def __init__(self, session: Session, label: str, unit: str):
        self.session, self.label, self.unit = session, label, unit
        self.start = time.monotonic()
        self.last: float | None = None

    def restart(self, label: str | None = None) -> None:
        """A new count (the next epoch's steps); the pacing goes on (no extra line for it)."""
        self.start = time.monotonic()
        if label is not None:
            self.label = label

    def update(self, done: int, total: int | None, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.last is not None and now - self.last < self.session.log_every:
            return
        self.last = now
        spent = now - self.start
        rate = done / spent if spent > 0 else 0.0
        parts = [f"{self.label}: {done}/{total if total is not None else '?'} {self.unit}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        if done and spent > 0:
            parts.append(f"{rate:.2f} {self.unit}/s")
            if total is not None and total >= done:
                parts.append(f"ETA {duration((total - done) / rate)}")
        parts.append(f"elapsed {duration(spent)}")
        self.session.progress(", ".join(parts) + (f", {extra}" if extra else ""))


class Heartbeat:
    """Calls `beat(seconds since start)` every `every` seconds from a daemon thread while the block runs: a
    sign of life for steps that report nothing for minutes (a benchmark section)."""

    def __init__(self, every: float, beat):
        self.every, self.beat = max(float(every), 1.0), beat
        self._done = threading.Event()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._done.wait(self.every):
            self.beat(time.monotonic() - start)

    def __enter__(self) -> "Heartbeat":
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
