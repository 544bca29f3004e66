"""Better int8: per-layer diagnosis, selective quantization and quantization-aware training.

- ``diagnose``: TFLite's QuantizationDebugger runs the calibration images through a
  debug-quantized model and reports, per quantized tensor, the error against float
  (RMSE, and RMSE divided by the tensor's quantization scale: about 0.29 is ideal rounding
  noise; much larger means the layer loses more than its step size).
- ``convert_selective``: keeps the worst K layers in float and quantizes the rest
  (``tflite-int8-selective``; a mixed model, float input and output).
- ``qat_model``: fine-tunes the classifier with fake-quant (tensorflow-model-optimization)
  so the weights adapt to int8, then converts to full-integer ``tflite-int8-qat``.
- ``int8_features``: the frozen backbone's pooled features as its full-integer TFLite
  conversion computes them, so the head can be trained on them too (int8-aware head).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from featx_edge.errors import ExportError


def _debugger(model, *, size: int, calibration: np.ndarray, denylisted_nodes: list[str] | None = None):
    from featx_edge._tf import import_tf

    tf, _ = import_tf()
    fn = tf.function(lambda image: model(image, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, size, size, 3], tf.float32, name="image"))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for image in calibration:
            yield [image[None].astype(np.float32)]

    converter.representative_dataset = representative
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylisted_nodes or None)
    try:
        return tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative,
                                                         debug_options=options)
    except Exception as err:
        raise ExportError(f"TFLite quantization debugger failed: {type(err).__name__}: {err}") from err


def diagnose(model, *, size: int, calibration: np.ndarray) -> list[dict]:
    """Per-layer int8 error of ``model`` on the calibration images, worst first."""
    debugger = _debugger(model, size=size, calibration=calibration)
    debugger.run()
    buf = io.StringIO()
    debugger.layer_statistics_dump(buf)
    rows = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        scale = float(row["scale"]) if row.get("scale") else 0.0
        mse = float(row["mean_squared_error"])
        rows.append({
            "tensor": row["tensor_name"], "op": row["op_name"],
            "rmse": mse ** 0.5, "scale": scale,
            "rmse_over_scale": (mse ** 0.5) / scale if scale else None,
            "max_abs_error": float(row["max_abs_error"]),
        })
    rows.sort(key=lambda r: -(r["rmse_over_scale"] or 0.0))
    return rows


def convert_selective(model, *, size: int, calibration: np.ndarray, keep_float: list[str]) -> bytes:
    """An int8 model with the named tensors' ops kept in float (QuantizationDebugger denylist)."""
    debugger = _debugger(model, size=size, calibration=calibration, denylisted_nodes=keep_float)
    try:
        return debugger.get_nondebug_quantized_model()
    except Exception as err:
        raise ExportError(f"selective int8 conversion failed: {type(err).__name__}: {err}") from err


def qat_model(model, *, trainable: tuple[str, ...] | None = None):
    """A fake-quant copy of the flat classifier (weights copied), ready to fine-tune.

    Args:
        trainable: names of the layers whose weights quantization-aware training may change
            (None: all). featx-edge passes the head's layers: the frozen backbone stays frozen,
            BatchNorm in inference mode, so the QAT model is the run's model with a head
            adapted to int8, and verify compares it with the run's reference.

    In-graph preprocessing layers (Rescaling, Normalization) are not quantized by tfmot; they
    pass through unchanged and the TFLite converter quantizes them from calibration.

    Raises:
        ExportError: the architecture has layers tfmot cannot quantize (e.g. MobileNetV3's
            hard-swish TFOpLambda).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras

    class NoOpQuantizeConfig(qk.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    passthrough = (keras.layers.Rescaling, keras.layers.Normalization)

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, passthrough):
            return qk.quantize_annotate_layer(clone, quantize_config=NoOpQuantizeConfig())
        return qk.quantize_annotate_layer(clone)

    try:
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        with qk.quantize_scope({"NoOpQuantizeConfig": NoOpQuantizeConfig}):
            qat = qk.quantize_apply(annotated)
    except Exception as err:  # tfmot raises RuntimeError/ValueError/AttributeError for unsupported layers
        raise ExportError(
            f"quantization-aware training cannot wrap this model ({type(err).__name__}: {str(err)[:300]}). "
            "Use post-training int8 (tflite-int8) or the selective variant for this backbone."
        ) from err
    if trainable is not None:
        for layer in qat.layers:
            # tfmot wraps each layer as `quant_<name>`; the wrapped layer keeps its own name.
            # A frozen inner BatchNormalization runs in inference mode during training.
            inner = getattr(layer, "layer", layer)
            inner.trainable = layer.trainable = inner.name in trainable
    return qat


def trainable_variables(qat, trainable: tuple[str, ...]) -> list:
    """The QAT model's variables that belong to the ``trainable`` layers.

    tfmot's wrappers list their layer's kernel as trainable whatever the layer's flag says, so
    ``fit`` would train the frozen backbone too; train these variables explicitly instead.
    """
    return [v for v in qat.trainable_variables if v.name.split("/")[0].removeprefix("quant_") in trainable]


def fit_variables(model, sequence, *, variables: list, epochs: int, learning_rate: float) -> dict:
    """Adam on sparse categorical cross-entropy, updating only ``variables``; returns the loss per epoch."""
    from featx_edge._tf import import_tf

    tf, keras = import_tf()
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    history = []
    for _ in range(epochs):
        losses = [float(step(*sequence[i])) for i in range(len(sequence))]
        sequence.on_epoch_end()
        history.append(float(np.mean(losses)))
    return {"loss": history}


def int8_features(feature_model, batches, *, size: int, calibration: np.ndarray) -> tuple[np.ndarray, dict]:
    """Pooled features of ``batches`` (uint8 images) through the full-integer TFLite backbone.

    The backbone is converted exactly as ``tflite-int8`` will convert it (same calibration
    images), then run by LiteRT. Training the head on these features as well as the float
    ones teaches it the directions int8 rounding moves the features in, so the float model
    and its int8 export agree on more images; the backbone itself is unchanged.

    Returns:
        (float32 (N, D) features, {"images", "conversion_seconds"}).
    """
    import time

    from featx_edge.export.tflite import TFLiteQuantization, convert
    from featx_edge.runtime.backends import LiteRTBackend

    t0 = time.perf_counter()
    flatbuffer = convert(feature_model, size=size, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
    seconds = time.perf_counter() - t0
    backend = LiteRTBackend(flatbuffer)
    out = [backend.run(batch) for batch in batches]
    features = np.concatenate(out) if out else np.zeros((0, feature_model.output_shape[-1]), np.float32)
    return features, {"images": len(features), "conversion_seconds": round(seconds, 2)}

