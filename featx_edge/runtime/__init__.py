"""The TensorFlow-free device runtime: numpy, Pillow and one inference engine.

Example:
    >>> from featx_edge.runtime import load
    >>> predictor = load("model.tflite-int8.tflite")  # doctest: +SKIP
    >>> for p in predictor.predict(["a.jpg", "b.png"], top_k=3):  # doctest: +SKIP
    ...     print(p.label, p.score)
"""

from featx_edge.runtime.predictor import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "load"]
