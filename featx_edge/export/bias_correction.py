"""Bias correction for int8: BatchNorm offsets that cancel the mean error of int8 weight rounding.

The int8 exports are converted from the corrected copy (``bias_corrected``) and verified against
the original model.
"""

from __future__ import annotations

import numpy as np


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


def bias_corrected(model, *, calibration: np.ndarray, images: int = 64, float_model=None) -> tuple[object, dict]:
    """A copy of ``model`` whose BatchNorm offsets cancel the mean error of int8 weight rounding.

    Rounding a kernel to int8 shifts each output channel by ``E[conv(x, W_int8 - W)]``, and on
    flat or gray images that shift is systematic: high-gain filters sum large weights to small
    outputs and their rounding errors no longer cancel. For each convolution followed by
    BatchNorm, input to output, the shift is measured on calibration images (with the earlier
    layers already rounded and corrected, as the int8 model will see them) and subtracted from
    the BatchNorm offset (Nagel et al., 2019, "Data-Free Quantization", empirical variant). The
    float weights are left as they are: the converter rounds them itself.

    One forward pass does it (``_Rounding``): each convolution, when the pass reaches it, is
    measured, rounded and its BatchNorm corrected before the pass goes on, so every later layer
    sees exactly what a separate pass per convolution (the earlier implementation, whose cost grew
    with the square of the depth) would have computed.

    ``float_model``: the float model ``model``'s kernels were rounded from (AdaRound's copy is
    already on the int8 grid, so its own kernels would show no rounding error): the shift is then
    measured against that model's kernels, layer by layer of the same name.

    Returns:
        (the corrected copy, {"layers", "calibration_images", "max_shift"}).
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    corrected, simulated = _twin(model, keras), _twin(model, keras)  # simulated: earlier kernels rounded as int8 will
    x = calibration[:images].astype(np.float32)
    targets = {conv.name: bn for conv, bn in _conv_bn_pairs(corrected)}
    floats = None if float_model is None else {name: float_model.get_layer(name).get_weights()[0] for name in targets}
    rounding = _Rounding(targets, depthwise=keras.layers.DepthwiseConv2D, floats=floats)
    pairs = _conv_bn_pairs(simulated)
    for conv, bn in pairs:
        rounding.attach(conv, bn)
    simulated(x, training=False)
    return corrected, {"layers": len(pairs), "calibration_images": len(x), "max_shift": round(rounding.largest, 6)}


class _Rounding:
    """Per-convolution hooks for one forward pass of the simulated copy: when a convolution runs it
    measures its output with the float kernel and with the int8-rounded one on the same inputs,
    keeps the rounded kernel (later layers see it) and moves the shift into the BatchNorm offsets of
    both the simulated copy and the corrected copy (``targets``: convolution name -> BatchNorm)."""

    def __init__(self, targets: dict, *, depthwise: type, floats: dict | None = None) -> None:
        self.targets, self.depthwise, self.largest = targets, depthwise, 0.0
        self.floats = floats  # convolution name -> the float kernel to measure against (default: its own)

    def attach(self, conv, bn) -> None:
        def measured(inputs, compute):
            (kernel,) = conv.get_weights()
            if self.floats is not None:  # the shift against the float kernel the grid kernel came from
                conv.set_weights([self.floats[conv.name]])
            before = compute(inputs)
            gamma, beta, mean, variance = bn.get_weights()
            gain = gamma / np.sqrt(variance + bn.epsilon)
            conv.set_weights([_int8_rounded(kernel, gain=gain, depthwise=isinstance(conv, self.depthwise))])
            after = compute(inputs)
            shift = (after.numpy() - before.numpy()).mean(axis=(0, 1, 2))
            new_beta = beta - shift * gain
            bn.set_weights([gamma, new_beta, mean, variance])
            self.targets[conv.name].set_weights([gamma, new_beta, mean, variance])
            self.largest = max(self.largest, float(np.abs(shift * gain).max()))
            return after

        _on_call(conv, measured)


def _twin(model, keras):
    """A copy of ``model``: the same graph and weights, to change without touching the model."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _on_call(layer, handle) -> None:
    """Make ``layer`` (of a throwaway copy: the change is never undone) answer each call with
    ``handle(inputs, compute)``, where ``compute(inputs)`` is the layer's own computation. One forward
    pass of the copy then visits every hooked layer input to output, with the earlier ones already
    changed: bias correction and AdaRound both work that way."""
    plain = type(layer).call

    def call(inputs, *args, **kwargs):
        return handle(inputs, lambda x: plain(layer, x, *args, **kwargs))

    layer.call = call
