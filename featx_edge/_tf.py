"""Lazy TensorFlow import. featx-edge trains with tf_keras (Keras 2): the Keras flavour that
tensorflow-model-optimization supports for quantization-aware training."""

from __future__ import annotations

import os
from types import ModuleType


def import_tf() -> tuple[ModuleType, ModuleType]:
    """Return ``(tensorflow, tf_keras)``, importing them on first use."""
    # Must be set before TensorFlow is first imported, so tf.keras (used by tfmot and the
    # TFLite converter) is the same Keras 2 that builds our models.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from featx_edge.progress import native_output

    try:
        with native_output("importing TensorFlow"):  # CUDA probes and oneDNN notices on stderr
            import tensorflow as tf
            import tf_keras as keras
    except ImportError as err:
        from featx_edge.errors import FeatxError

        raise FeatxError(
            "training and export need TensorFlow, which is not installed here "
            f"({err}). Install the training extra: `pip install 'featx-edge[train]'`. "
            "The device runtime (`featx-edge predict`) does not need it."
        ) from err
    return tf, keras
