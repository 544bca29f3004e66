"""Better int8: per-layer diagnosis, selective quantization and quantization-aware training.

- ``diagnose``: TFLite's QuantizationDebugger runs the calibration images through a
  debug-quantized model and reports, per quantized tensor, the error against float
  (RMSE, and RMSE divided by the tensor's quantization scale: about 0.29 is ideal rounding
  noise; much larger means the layer loses more than its step size).
- ``convert_selective``: keeps the worst K layers in float and quantizes the rest
  (``tflite-int8-selective``; a mixed model, float input and output).
- ``qat_model``: fine-tunes the classifier with fake-quant (tensorflow-model-optimization)
  so the weights adapt to int8, then converts to full-integer ``tflite-int8-qat``.
- ``bias_corrected``: a copy of the model whose BatchNorm offsets cancel the mean error that
  int8 weight rounding adds to each channel (empirical bias correction); the int8 exports are
  converted from it, and verified against the original model.
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


def fit_variables(model, sequence, *, variables: list, epochs: int, learning_rate: float, teacher=None) -> dict:
    """Adam updating only ``variables``; returns the loss per epoch.

    Args:
        teacher: None to fit the labels (sparse categorical cross-entropy); a model to fit its
            output probabilities instead (distillation). featx-edge's QAT distils from the run's
            float reference: the int8 model is judged by how well it matches that model, so that
            is what it learns, not the labels (fitting labels drifted from the reference: 0.96-0.97
            agreement against 0.98-0.99 for plain int8, measured on the demo).
    """
    from featx_edge._tf import import_tf

    tf, keras = import_tf()
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    sparse = keras.losses.SparseCategoricalCrossentropy()
    soft = keras.losses.CategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = sparse(y, out) if teacher is None else soft(teacher(x, training=False), out)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    history = []
    for _ in range(epochs):
        losses = [float(step(*sequence[i])) for i in range(len(sequence))]
        sequence.on_epoch_end()
        history.append(float(np.mean(losses)))
    return {"loss": history}


def init_qat_ranges(qat, model, *, calibration: np.ndarray, batch_size: int = 32) -> int:
    """Start the QAT model's activation ranges at the float model's, measured on calibration images.

    tfmot starts every activation range at [-6, 6] and moves it by an exponential moving average
    (decay 0.999) while training: after a few hundred steps the linear bottlenecks of
    EfficientNet-Lite (values up to +-50) are still clipped at +-6, and the QAT model's output
    is noise (measured: 8% agreement with its float twin). Starting from the measured ranges,
    the fake-quant model is the float model plus int8 rounding from the first step (96%
    agreement before any training, measured on the demo).

    Returns:
        The number of activation ranges set.
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    # One training-mode call sets the weight ranges (tfmot computes them from the kernels only
    # in training mode) and the input range; the activation ranges are overwritten below.
    qat(calibration[:batch_size].astype(np.float32), training=True)
    wrapped = {layer.layer.name: layer for layer in qat.layers if hasattr(layer, "layer")}
    names = [layer.name for layer in model.layers if layer.name in wrapped]
    probe = keras.Model(model.input, [model.get_layer(name).output for name in names])
    low = dict.fromkeys(names, 0.0)  # int8 ranges always include 0
    high = dict.fromkeys(names, 0.0)
    for start in range(0, len(calibration), batch_size):
        outputs = probe(calibration[start:start + batch_size].astype(np.float32), training=False)
        for name, out in zip(names, outputs if len(names) > 1 else [outputs]):
            out = out.numpy()
            low[name], high[name] = min(low[name], float(out.min())), max(high[name], float(out.max()))
    count = 0
    for name in names:
        for var in wrapped[name].weights:
            leaf = var.name.split("/")[-1].split(":")[0]
            if var.shape.rank == 0 and leaf in ("output_min", "post_activation_min"):
                var.assign(low[name])
                count += 1
            elif var.shape.rank == 0 and leaf in ("output_max", "post_activation_max"):
                var.assign(high[name])
                count += 1
    return count


def _conv_bn_pairs(model) -> list[tuple]:
    """(convolution, the BatchNormalization right after it) for every such pair, input to output."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    pairs = []
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) or layer.use_bias:
            continue
        nodes = layer.outbound_nodes
        if len(nodes) == 1 and isinstance(nodes[0].outbound_layer, keras.layers.BatchNormalization):
            pairs.append((layer, nodes[0].outbound_layer))
    return pairs


def _int8_rounded(kernel: np.ndarray, *, gain: np.ndarray, depthwise: bool) -> np.ndarray:
    """``kernel`` after the converter's per-channel symmetric int8 rounding of the folded kernel.

    TFLite and onnxruntime fold BatchNorm into the convolution (kernel x gain per output
    channel) and round each output channel to 255 levels of max|w| / 127.
    """
    shape = (1, 1, -1, 1) if depthwise else (1, 1, 1, -1)
    folded = kernel * gain.reshape(shape)
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    scale = np.abs(folded).max(axis=axes, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    rounded = np.clip(np.round(folded / scale), -127, 127) * scale
    safe = np.where(np.abs(gain) < 1e-12, 1e-12, gain).reshape(shape)
    return (rounded / safe).astype(kernel.dtype)


def bias_corrected(model, *, calibration: np.ndarray, images: int = 64) -> tuple[object, dict]:
    """A copy of ``model`` whose BatchNorm offsets cancel the mean error of int8 weight rounding.

    Rounding a kernel to int8 shifts each output channel by ``E[conv(x, W_int8 - W)]``, and on
    flat or gray images that shift is systematic: high-gain filters sum large weights to small
    outputs and their rounding errors no longer cancel. For each convolution followed by
    BatchNorm, input to output, the shift is measured on calibration images (with the earlier
    layers already rounded and corrected, as the int8 model will see them) and subtracted from
    the BatchNorm offset (Nagel et al., 2019, "Data-Free Quantization", empirical variant). The
    float weights are left as they are: the converter rounds them itself.

    Returns:
        (the corrected copy, {"layers", "calibration_images", "max_shift"}).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()

    def copy():
        twin = keras.models.clone_model(model)
        twin.set_weights(model.get_weights())
        return twin

    corrected, simulated = copy(), copy()  # simulated: earlier kernels rounded as int8 will
    x = calibration[:images].astype(np.float32)
    sim_pairs = {conv.name: (conv, bn) for conv, bn in _conv_bn_pairs(simulated)}
    largest = 0.0
    pairs = _conv_bn_pairs(corrected)
    for conv, bn in pairs:
        sim_conv, sim_bn = sim_pairs[conv.name]
        gamma, beta, mean, variance = bn.get_weights()
        gain = gamma / np.sqrt(variance + bn.epsilon)
        inputs = keras.Model(simulated.input, sim_conv.input)(x, training=False).numpy()
        before = sim_conv(inputs).numpy()
        (kernel,) = sim_conv.get_weights()
        sim_conv.set_weights([_int8_rounded(kernel, gain=gain,
                                            depthwise=isinstance(conv, keras.layers.DepthwiseConv2D))])
        shift = (sim_conv(inputs).numpy() - before).mean(axis=(0, 1, 2))
        new_beta = beta - shift * gain
        bn.set_weights([gamma, new_beta, mean, variance])
        sim_bn.set_weights([gamma, new_beta, mean, variance])
        largest = max(largest, float(np.abs(shift * gain).max()))
    return corrected, {"layers": len(pairs), "calibration_images": len(x), "max_shift": round(largest, 6)}
