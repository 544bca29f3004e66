"""The run contract: what a run directory holds and its manifest.

Modules: ``names`` (every file name inside a run, in one table), ``manifest`` (layout version,
reading and checking ``manifest.json``, the artifacts it lists), ``out`` (checking a new run's
``--out`` folder before any work). Opening a trained run with its Keras reference is
``training.run.Run``.

May import: errors, files.
"""
