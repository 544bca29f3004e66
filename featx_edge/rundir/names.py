"""Every file name inside a run directory, in one table (the run contract of DESIGN.md).
"""

from __future__ import annotations

import logging

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


SPLITS = "splits.json"


WEIGHTS = "model.weights.h5"


EXPORT_DIR = "export"


VERIFY = "verify.json"


INT8_LAYERS = "int8_layers.json"


EXPORT_JOURNAL = ".export-journal.json"
