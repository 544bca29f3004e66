"""featx-edge: transfer-learned image classifiers, exported and verified for edge devices.

The package root imports nothing heavy: ``import featx_edge.runtime`` works on a device
without TensorFlow. Training and export import TensorFlow lazily.
"""

__version__ = "0.1.0"
