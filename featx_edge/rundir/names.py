"""Every file name inside a run directory, in one table (the run contract of DESIGN.md).

Code that reads or writes a run's file takes its name from here. Files beside the run folder
(its lock, replacement journal and training checkpoints) are file mechanics, named in
``files`` and ``training.checkpoints``; they outlive the folder and are not part of it.
"""

from __future__ import annotations

# -- written by train ------------------------------------------------------------------------
MANIFEST = "manifest.json"
"""Schema version, labels, backbone, input, training metrics, config, artifacts (``rundir.manifest``)."""
SPLITS = "splits.json"
"""Which image files are train / val / test (test is never trained on)."""
WEIGHTS = "model.weights.h5"
"""The Keras reference's weights (rebuilt from the recorded config; no code is loaded)."""

# -- written by export -----------------------------------------------------------------------
EXPORT_DIR = "export"
"""One file per format: ``model.<format><suffix>`` (``formats.registry.artifact_filename``)."""
SELFTEST_DIR = "selftest"
"""``export/selftest/``: the golden self-test files beside the exports. The runtime, which imports no
``rundir``, names the same folder ``runtime.selftest.SELFTEST_DIR`` (a bundle holds it too);
tests/test_verify_record.py checks that the two agree."""
FIRMWARE_DIR = "mcu"
"""``export/mcu/<format>/``: the firmware sources ``featx-edge mcu`` writes (``mcu.firmware``)."""
INT8_LAYERS = "int8_layers.json"
"""The per-layer int8 error ranking (exporting ``tflite-int8-selective`` writes it)."""
EXPORT_JOURNAL = ".export-journal.json"
"""An export being committed: the format and sha256 it moves into place (recovered on open)."""

# -- written by verify -----------------------------------------------------------------------
VERIFY = "verify.json"
"""The verify record: per format its sha256 and verdict (``verify.record`` reads and writes it)."""
PREDICTIONS = "verify_predictions.json"
"""Per test image: top-1 class and its probability, of the reference and of each verified format."""
REFERENCE_OUTPUTS = "verify_reference.npy"
"""The Keras reference's probabilities on the test split (what ``device-check`` judges against)."""

# -- written by bench, report, device-check, mcu, fit ------------------------------------------
BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
BENCH_PNG = "bench.png"
REPORT = "report.html"
DEVICE_CHECK = "device_check.json"
MCU_JSON = "mcu.json"
"""What ``featx-edge mcu`` found per format: TFLM fidelity and arena, Vela per NPU, profile fits."""
FIT_JSON = "fit.json"
"""What ``featx-edge fit`` searched: the profile, every candidate's figures, the chosen one, the final export's."""

RUN_FILES: tuple[str, ...] = (MANIFEST, SPLITS, WEIGHTS, EXPORT_DIR, INT8_LAYERS, EXPORT_JOURNAL, VERIFY,
                              PREDICTIONS, REFERENCE_OUTPUTS, BENCH_JSON, BENCH_MD, BENCH_PNG, REPORT,
                              DEVICE_CHECK, MCU_JSON, FIT_JSON)
"""Every name at the top of a run directory (``export/`` holds the artifacts, ``selftest/`` and ``mcu/``)."""
