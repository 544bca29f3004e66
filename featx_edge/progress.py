"""Progress output: messages through ``logging``, bars through tqdm, both off unless asked for.

Every module logs to a child of the ``featx_edge`` logger (``logging.getLogger(__name__)``) at
INFO. As a library featx-edge is silent (Python's default level is WARNING); the CLI calls
``configure(quiet=...)``, which prints INFO messages as plain lines and turns bars on. Bars are
shown only on a terminal (tqdm's ``disable=None``), so logs and CI output carry no bar noise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

LOGGER = "featx_edge"


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
        except (OSError, ValueError, TypeError):  # a logging failure must not stop the command
            self.handleError(record)


def configure(*, quiet: bool = False) -> None:
    """Print featx-edge's messages: INFO on stdout, warnings on stderr (warnings only with ``quiet``)."""
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
