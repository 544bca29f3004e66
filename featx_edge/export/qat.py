"""Quantization-aware training (tensorflow-model-optimization) of the head, for ``tflite-int8-qat``.

``qat_model`` wraps the flat classifier with fake-quant; ``init_qat_ranges`` starts its activation
ranges at the float model's; ``fit_variables`` trains only the head's variables, distilling from
the float reference; ``export_qat`` does all three and converts to full-integer TFLite.
"""

from __future__ import annotations

import logging

import numpy as np

from featx_edge.errors import ExportError

log = logging.getLogger(__name__)

QAT_TRAINABLE = ("head_dense", "probabilities")
"""Layers quantization-aware training may change: the head. The backbone stays as trained, so
``tflite-int8-qat`` is the run's model (with an int8-adapted head), compared with its reference."""


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

    NoOpQuantizeConfig = _noop_quantize_config(qk)  # a class: tfmot finds it by this name
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
        _train_only(qat, trainable)
    return qat


def _noop_quantize_config(qk):
    """A tfmot QuantizeConfig that quantizes nothing: the preprocessing layers pass through it."""

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

    return NoOpQuantizeConfig


def _train_only(qat, trainable: tuple[str, ...]) -> None:
    """Freeze every layer of the QAT model but those named in ``trainable``."""
    for layer in qat.layers:
        # tfmot wraps each layer as `quant_<name>`; the wrapped layer keeps its own name.
        # A frozen inner BatchNormalization runs in inference mode during training.
        inner = getattr(layer, "layer", layer)
        inner.trainable = layer.trainable = inner.name in trainable


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


def export_qat(run, *, calibration: np.ndarray) -> tuple[bytes, dict]:
    """``tflite-int8-qat``: QAT of the run's head (distilled from its reference), then full-integer TFLite.

    Returns the flatbuffer and the metadata entry describing the recipe.
    """
    import time

    from featx_edge.errors import ConfigError
    from featx_edge.export.tflite import TFLiteQuantization, convert
    from featx_edge.training.train import image_sequence

    config, splits, reference = run.config, run.splits(), run.reference().model
    epochs = config.train.qat_epochs
    if epochs < 1:
        raise ConfigError("tflite-int8-qat needs `--qat-epochs N` (N >= 1) of quantization-aware training.")
    qat = qat_model(reference, trainable=QAT_TRAINABLE)
    init_qat_ranges(qat, reference, calibration=calibration)
    log.info("  quantization-aware training of the head (%s; the backbone stays frozen): %d epoch(s), lr %s",
             ", ".join(QAT_TRAINABLE), epochs, config.train.qat_learning_rate)
    seq = image_sequence(splits.root, splits.train, splits.labels("train"), size=run.size,
                         batch_size=config.train.batch_size, seed=config.seed + 2)
    t0 = time.perf_counter()
    history = fit_variables(qat, seq, variables=trainable_variables(qat, QAT_TRAINABLE), epochs=epochs,
                            learning_rate=config.train.qat_learning_rate, teacher=reference)
    seconds = time.perf_counter() - t0
    flatbuffer = convert(qat, size=run.size, quantization=TFLiteQuantization.for_int8(), calibration=calibration)
    return flatbuffer, {"quantization": {"method": "tfmot quantization-aware training", "epochs": epochs,
                                         "trained_layers": list(QAT_TRAINABLE),
                                         "objective": "distillation from the float reference",
                                         "loss": history["loss"], "seconds": round(seconds, 2)}}
