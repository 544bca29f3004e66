"""Microcontrollers and NPUs: ``featx-edge mcu RUN`` checks each fully-integer export with the kernels that
run there and sizes it for the part.

Modules, one job each: ``tflm`` (TensorFlow Lite Micro on the test split, its arena; ``tflm_worker``
is its child process), ``vela`` (Arm Ethos-U compilation and Vela's summary), ``profiles`` (RAM
and flash of common parts, the fit verdict), ``firmware`` (C sources for a TFLM application),
``check`` (the command: judges, sizes, writes ``RUN/mcu.json``), ``table`` (its printed table).
Needs the ``[mcu]`` extra (``tflite-micro``, ``ethos-u-vela``); both run in child processes.

May import: verify (the reference outputs it records), export (``op_types``), training (``Run``),
fidelity (the gate), data (decoding the test split as verify does), runtime, rundir, files, formats
and the leaves. Never bench, bundle, report, device or cli (bundle and report read ``mcu.json``
through this package).
"""

from featx_edge.rundir.names import MCU_JSON  # the run-file table names it

__all__ = ["MCU_JSON", "SCHEMA"]
SCHEMA = "featx-edge-mcu/1"
