"""``featx-edge bundle``: a self-contained folder or zip to hand to a device.

Modules: ``pack`` (the chosen export, its self-test, labels, a README and this package's own
wheel), ``own_wheel`` (building that wheel from the installed package), ``firmware``
(``--target mcu``: the firmware sources ``featx-edge mcu`` wrote, its ``mcu.json`` and a README).

May import: verify (the verify record), mcu (its record and file names), runtime, training (``Run``),
rundir, files, formats and the leaves.
"""
