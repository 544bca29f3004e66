"""A new run's folder: checked before any work, then built in a staging folder beside it."""

from __future__ import annotations

from pathlib import Path

from featx_edge.errors import RunDirError
from featx_edge.files.ownership import owner_problem
from featx_edge.files.replace import check_out, make_staging
from featx_edge.rundir.names import MANIFEST


def prepare_out(out: Path, *, overwrite: bool, data_root: Path) -> Path:
    """Check that ``out`` can take a new run, before any work; returns an empty, marked staging folder.

    Refused: what ``check_out`` refuses; an existing non-empty folder unless ``overwrite`` and
    featx-edge made it as a run (``ownership``: a folder of other files, or a run of an earlier
    version without the marker, is never replaced); a parent folder that cannot be written.
    """
    out = check_out(out, data_root=data_root)
    if out.is_dir() and any(out.iterdir()):
        if problem := owner_problem(out, kind="run", record=MANIFEST):
            raise RunDirError(f"`--out {out}` {problem}, so it is not a featx-edge run (or is one of an earlier "
                              "version); `--overwrite` replaces only runs featx-edge made. Choose a new folder, or "
                              f"delete it yourself if you no longer need it (`rm -r {out}`).")
        if not overwrite:
            raise RunDirError(f"`--out {out}` already holds a run; pass `--overwrite` to replace it as a whole "
                              "(its exports and reports go with it), or choose a new folder.")
    return make_staging(out, kind="run")
