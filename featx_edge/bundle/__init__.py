"""``featx-edge bundle``: a self-contained folder or zip to hand to a device.

Modules: ``pack`` (the chosen export, its self-test, labels, a README and this package's own
wheel), ``own_wheel`` (building that wheel from the installed package).

May import: verify (the verify record), runtime, training (``Run``), rundir, files, formats and the leaves.
"""
