"""Format knowledge in one place: the export formats and the CPU targets of int8 recipes.

Modules: ``registry`` (``FORMATS``: name -> ``FormatSpec``: suffix, quantization recipe, input
dtype, thresholds, kernel sets, float sibling, self-test and device tolerances), ``targets``
(which ONNX int8 recipe suits which CPU). Code elsewhere asks a ``FormatSpec``; it never tests
format names by their spelling.

May import: errors only (the TensorFlow-free runtime imports it).
"""
