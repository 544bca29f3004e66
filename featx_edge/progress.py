"""Progress output: messages through ``logging``, bars through tqdm, both off unless asked for.

Every module logs to a child of the ``featx_edge`` logger (``logging.getLogger(__name__)``) at
INFO. As a library featx-edge is silent (Python's default level is WARNING); the CLI calls
``configure(quiet=...)``, which prints INFO messages as plain lines and turns bars on. Bars are
shown only on a terminal (tqdm's ``disable=None``), so logs and CI output carry no bar noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator

LOGGER = "featx_edge"
_verbose = False
_NATIVE_LOCK = threading.RLock()


def enabled() -> bool:
    """Whether progress is wanted (the ``featx_edge`` logger passes INFO)."""
    return logging.getLogger(LOGGER).isEnabledFor(logging.INFO)


class _Console(logging.Handler):
    """INFO as plain lines on stdout, WARNING and up as ``warning: ...`` on stderr.

    The stream is looked up at each message (not bound once), so redirected or captured
    ``sys.stdout`` / ``sys.stderr`` (pytest, notebooks) receive the lines.
    """

    _featx_edge = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"{record.levelname.lower()}: {message}", file=sys.stderr, flush=True)
            else:
                print(message, file=sys.stdout, flush=True)
        except BrokenPipeError:  # `featx-edge run ... | head`: the reader left; the work goes on, unprinted
            if record.levelno < logging.WARNING:
                drop_stdout()
        except (OSError, ValueError, TypeError):  # a logging failure must not stop the command
            self.handleError(record)


def drop_stdout() -> None:
    """Point stdout at os.devnull after its reader closed the pipe (``featx-edge ... | head``).

    Later prints, and Python's flush of what is still buffered at exit, then go nowhere instead
    of raising BrokenPipeError again (the recipe of the Python docs, "Note on SIGPIPE").
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output): swap the object
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    finally:
        os.close(devnull)


def say(text: str) -> None:
    """Print a result line to stdout; if its reader has gone, drop stdout and carry on.

    For output printed while work is still to be done (``run``'s table comes before its
    report.html): a closed pipe must never stop a command from finishing its files.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        drop_stdout()


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """Print featx-edge's messages: INFO on stdout, warnings on stderr (warnings only with ``quiet``).

    ``verbose`` also lets through what the engines print themselves (TensorFlow's native log,
    the converters, onnxruntime's calibration, Keras's epoch lines), which ``native_output``
    otherwise holds back and shows only when the step fails.
    """
    global _verbose
    _verbose = verbose
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if getattr(handler, "_featx_edge", False):
            logger.removeHandler(handler)
    logger.addHandler(_Console())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def bar(iterable: Iterable, *, total: int | None = None, desc: str, unit: str = "img") -> Iterable:
    """``iterable`` with a tqdm bar when progress is enabled, on a terminal, and tqdm is installed."""
    if not enabled():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # the device runtime does not need tqdm
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=None)


def verbose() -> bool:
    """Whether the engines' own output is wanted (``--verbose``)."""
    return _verbose


@contextlib.contextmanager
def native_output(what: str) -> Iterator[None]:
    """Hold back what third-party code prints during ``what`` (to file descriptors 1 and 2, so
    native C++ logging too); print it to stderr only if the step fails, or always with --verbose.

    Wrap only calls into other libraries: featx-edge's own messages inside would be held too.
    """
    if _verbose:
        yield
        return
    # One thread at a time: descriptors 1 and 2 are the process's, and two threads swapping them at
    # once would leave stdout pointing at a closed temporary file (verify's runners run in threads).
    with _NATIVE_LOCK, _held_output(what):
        yield


@contextlib.contextmanager
def _held_output(what: str) -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no usable descriptors (an embedded interpreter): nothing to hold back
            yield
            return
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:
                sink.seek(0)
                held = sink.read().decode("utf-8", "replace").strip()
                if held:
                    tail = "\n".join(held.splitlines()[-60:])
                    print(f"output of {what} (it failed):\n{tail}", file=sys.stderr, flush=True)


class StageClock:
    """Wall and CPU seconds per named stage of one command (``featx-edge run``'s stage times).

    Stages are recorded only while a clock is started (``StageClock.started()``), so the library
    functions that mark their stages cost nothing when called on their own. A stage entered twice
    adds up; nested stages are recorded each under its own name (``export`` holds each
    ``export tflite-int8``).
    """

    _current: StageClock | None = None

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self._since = (time.perf_counter(), time.process_time())  # where the next ``lap`` starts
        self._start = self._since

    def add(self, name: str, since: tuple[float, float]) -> None:
        """Add the time from ``since`` (perf_counter, process_time) to now to stage ``name``."""
        now = (time.perf_counter(), time.process_time())
        self.add_seconds(name, seconds=now[0] - since[0], cpu_seconds=now[1] - since[1])
        self._since = now

    def add_seconds(self, name: str, *, seconds: float, cpu_seconds: float) -> None:
        """Add so many wall and CPU seconds to stage ``name`` (a stage entered twice adds up)."""
        row = self.stages.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0})
        row["seconds"] = round(row["seconds"] + seconds, 3)
        row["cpu_seconds"] = round(row["cpu_seconds"] + cpu_seconds, 3)

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator[StageClock]:
        """Record the stages of the code inside; yields the clock (its ``stages`` fill as they end)."""
        clock, previous = cls(), cls._current
        cls._current = clock
        try:
            yield clock
        finally:
            cls._current = previous

    def total(self) -> dict[str, float]:
        """Wall and CPU seconds since the clock started."""
        return {"seconds": round(time.perf_counter() - self._start[0], 3),
                "cpu_seconds": round(time.process_time() - self._start[1], 3)}

    def lines(self) -> list[str]:
        """One line per stage: name, wall seconds, CPU seconds (every thread of this process)."""
        width = max([len(name) for name in self.stages] + [len("total")])
        return [f"  {name:<{width}} {row['seconds']:8.1f} s wall {row['cpu_seconds']:8.1f} s CPU"
                for name, row in self.stages.items()]


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the code inside as ``name`` on the started StageClock (nothing when none is started)."""
    clock = StageClock._current
    if clock is None:
        yield
        return
    since = (time.perf_counter(), time.process_time())
    try:
        yield
    finally:
        clock.add(name, since)


def record(name: str, *, seconds: float, cpu_seconds: float) -> None:
    """Add time measured elsewhere (another process) to stage ``name`` on the started clock."""
    clock = StageClock._current
    if clock is not None:
        clock.add_seconds(name, seconds=seconds, cpu_seconds=cpu_seconds)


def lap(name: str) -> None:
    """Record the time since the last lap or stage end as ``name`` (for a long function's steps
    without re-indenting them); nothing when no StageClock is started."""
    clock = StageClock._current
    if clock is not None:
        clock.add(name, clock._since)
