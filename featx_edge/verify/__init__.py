"""``featx-edge verify``: every export against the Keras reference on the test split.

Modules: ``runner`` (runs every export on every kernel set and judges it), ``record`` (``verify.json``:
its schema, reading, writing and the one staleness rule, which bench, report, bundle and device ask).

May import: export, training (``Run`` and its reference), fidelity (the gate), runtime (to run
exports as a device would), data, rundir, files, formats and the leaves. Never bench, report,
device or cli.
"""
