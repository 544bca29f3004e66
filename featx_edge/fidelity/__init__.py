"""Does an export still compute what the reference computes: the gate and its statistics.

Modules: ``gate`` (``compare``: agreement, accuracy change, ties, |Δp|; ``check`` against a
format's thresholds), ``intervals`` (Wilson and paired-difference intervals).

May import: errors, formats. Used by export (choosing int8 variants), verify and device.
"""
