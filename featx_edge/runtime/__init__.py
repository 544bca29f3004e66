"""The TensorFlow-free device runtime: numpy, Pillow and one inference engine.

May import: errors, formats, files, progress, versions; numpy, Pillow and one engine. Never
TensorFlow, Keras or the training side (a device installs the base package only).

Example:
    >>> from featx_edge.runtime import load
    >>> predictor = load("model.tflite-int8.tflite")  # doctest: +SKIP
    >>> for p in predictor.predict(["a.jpg", "b.png"], top_k=3):  # doctest: +SKIP
    ...     print(p.label, p.score)
"""

from featx_edge.runtime.predictor import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "load"]
