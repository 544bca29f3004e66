"""Command line: argument parsing (``parser``) -> one function per command (``commands``).

``featx-edge`` and ``python -m featx_edge.cli`` both call ``main``.
"""

from __future__ import annotations

import errno
import os
import sys

from featx_edge.cli.commands import COMMANDS
from featx_edge.cli.parser import build_parser
from featx_edge.errors import FeatxError

__all__ = ["COMMANDS", "build_parser", "main"]

# What to do about the operating system's refusals that a user's paths cause.
_OS_FIXES = {
    errno.ENAMETOOLONG: "a folder or file name in it is longer than the file system allows (usually 255 bytes); "
                        "use shorter names",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder where a file is expected; remove or rename it",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "the file system is read-only; choose a writable place",
    errno.ENOSPC: "the disk is full; free some space",
    errno.ELOOP: "it is a symlink loop; fix the links",
}


def main(argv: list[str] | None = None) -> int:
    from featx_edge.progress import configure

    args = build_parser().parse_args(argv)
    configure(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial files were left behind", file=sys.stderr)
        return 130


def _os_error_line(err: OSError) -> str:
    """One line for an OSError about a path: the path(s), the system's reason and the fix."""
    from featx_edge.runtime.metadata import printable

    names = " -> ".join(f"`{printable(os.fsdecode(name))}`" for name in (err.filename, err.filename2)
                        if name is not None)
    reason = (err.strerror or type(err).__name__).lower()
    return f"{names}: {reason}; {_OS_FIXES.get(err.errno, 'check the path and its permissions')}."
