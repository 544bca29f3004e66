"""Command line: argument parsing (``parser``) -> one function per command (``commands``).

``featx-edge`` and ``python -m featx_edge.cli`` both call ``main``.
"""

from __future__ import annotations

import sys

from featx_edge.cli.commands import COMMANDS
from featx_edge.cli.parser import build_parser
from featx_edge.errors import FeatxError

__all__ = ["COMMANDS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    from featx_edge.progress import configure

    args = build_parser().parse_args(argv)
    configure(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial files were left behind", file=sys.stderr)
        return 130
