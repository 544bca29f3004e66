"""``RUN/report.html``: one self-contained page about a run, made from its files alone.

The page holds the run's settings, training curves, verify's table (entries measured on an
earlier file marked stale), the confusion matrices of the reference and of every export, the
test images on which an int8 export disagrees with the reference, the per-layer int8 error
ranking, the bench results and the microcontroller check (``mcu.json``), when the run has them.
No model is run: the per-image predictions come from ``featx-edge verify``
(``RUN/verify_predictions.json``). Nothing is loaded from elsewhere (inline CSS, images as data
URIs, no script), so it opens offline and can be mailed as one file.

Modules: ``page`` (escaping HTML building blocks), ``figures`` (PNG curves and thumbnails),
``sections`` (one function per section), ``mcu_section`` (the microcontroller section).

May import: bench, mcu (its ``mcu.json``), verify, training (``Run``), rundir, files, formats, runtime
and the leaves. Never cli.

Example:
    >>> from featx_edge.report import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

from featx_edge import __version__
from featx_edge.errors import FeatxError, RunDirError
from featx_edge.files.atomic import write_bytes
from featx_edge.files.lock import locked
from featx_edge.report import mcu_section, sections
from featx_edge.report.page import page
from featx_edge.rundir.names import REPORT
from featx_edge.training.run import Run

log = logging.getLogger(__name__)


def build_report(run: Run) -> str:
    """The report of an opened run, as an HTML document (reads the run's files, writes nothing)."""
    src = sections.Sources(run)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    usable, problems = sections.usable_predictions(src)
    return page(f"featx-edge report: {run.path.name}",
                sections.header(src, version=__version__, created=created),
                sections.training(src),
                sections.verify(src),
                sections.confusion(src, usable, problems),
                sections.gallery(src, usable, problems),
                sections.int8_layers(src),
                sections.bench(src),
                mcu_section.mcu(src))


def write_report(run: str | Path) -> Path:
    """Write ``RUN/report.html`` (atomically) under the run's lock; returns its path.

    Raises:
        RunDirError: ``run`` is not a run directory (naming the fix), another command holds it, or
            the page cannot be written there.
    """
    with locked(run, command="report", create=False):
        opened = Run.open(run)
        document = build_report(opened).encode("utf-8")
        try:
            path = write_bytes(opened.path / REPORT, document)
        except OSError as err:
            raise RunDirError(f"cannot write `{opened.path / REPORT}` ({err.strerror or err}); the run folder must "
                              "be writable (or copy the run somewhere writable and report there).") from err
    log.debug("wrote %s (%.0f kB)", path, path.stat().st_size / 1e3)
    return path


def report_after_run(run: str | Path) -> Path | None:
    """``featx-edge run``'s last step (also after a verify failure, when the page helps most).

    A report that cannot be written is logged as a warning and None returned: it never hides the
    run's own result (a verify failure stays the error and the exit status).
    """
    try:
        path = write_report(run)
    except (FeatxError, OSError) as err:
        log.warning("%s was not written: %s. Retry with `featx-edge report %s`.", Path(run) / REPORT, err, run)
        return None
    log.info("wrote %s", path)
    return path
