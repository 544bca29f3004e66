"""AdaRound for int8: learned per-weight rounding (up or down) of every convolution followed by BatchNorm.

Nearest rounding of each weight is not the rounding that keeps a layer's output closest to float:
the errors of neighbouring weights add up over an input patch, and on flat images they stop
cancelling (the diagnosis of issue 21). AdaRound (Nagel et al., ICML 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization") learns, per weight, floor or ceil of ``w / scale``
minimising the squared error of the layer's output on calibration images.

The converters fold BatchNorm into the convolution (kernel x gain per output channel) and round the
folded kernel per output channel, symmetric, to max|w| / 127 steps (``bias_correction._int8_rounded``).
This module chooses the integers ``q`` of that folded kernel and writes back the float kernel
``scale * q / gain``: each channel's largest weight keeps its nearest rounding (+-127), so the
converter computes the same scale and rounds every weight back to exactly ``q``.

The objective is quadratic in the kernel error: for output channel ``c`` it is ``dw_c' H dw_c`` with
``H`` the second moment of the layer's input patches on the calibration images (computed through
the copy whose earlier layers are already rounded, as the int8 model sees them). ``H`` is computed
once per layer and factored (``F F' = H``), so each optimisation step is a small matrix product,
not a pass over the images, and the loss is the exact calibration-set error. A channel keeps nearest
rounding where AdaRound's hard choice does not lower that channel's error.
"""

from __future__ import annotations

import time

import numpy as np

from featx_edge.export.bias_correction import _conv_bn_pairs, _on_call, _twin

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # regulariser annealing: none for the first 20% of steps
# Weight of the rounding regulariser (mean over weights) against the output error relative to nearest
# rounding's: with the error so normalised, 1-3 gave the lowest hard-rounded error at 1,000 steps on
# layers with correlated inputs (0.01-10 tried; below 1 the soft solution is not binary by the end).
REGULARISER = 3.0
LEARNING_RATE = 0.01
ENERGY = 1 - 1e-4  # share of a layer's input energy (trace of the patch second moment) the learning sees


def _folded(conv, bn, keras) -> tuple[np.ndarray, np.ndarray, bool]:
    """(kernel as (K, out channels) or (K, channels) for depthwise, the BatchNorm gain, depthwise)."""
    gamma, _, _, variance = bn.get_weights()
    gain = gamma / np.sqrt(variance + bn.epsilon)
    (kernel,) = conv.get_weights()
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    kh, kw = kernel.shape[:2]
    flat = kernel.reshape(kh * kw, -1) if depthwise else kernel.reshape(-1, kernel.shape[-1])
    return flat.astype(np.float64) * gain[None, :], gain, depthwise


def _patches(layer, inputs: np.ndarray, tf) -> object:
    """The layer's input patches, (M, kh*kw*C) in the kernel's (kh, kw, C) order."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    patches = tf.image.extract_patches(inputs, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                       rates=[1, dh, dw, 1], padding=layer.padding.upper())
    return tf.reshape(patches, (-1, patches.shape[-1]))


def _second_moment(layer, inputs: np.ndarray, *, depthwise: bool, tf) -> np.ndarray:
    """E[patch patch'] over every output position: (K, K), or (C, kh*kw, kh*kw) per depthwise channel."""
    kh, kw = layer.kernel_size
    total, rows = 0.0, 0
    for start in range(0, len(inputs), 16):  # chunks: early layers have many positions
        x = tf.cast(_patches(layer, inputs[start:start + 16], tf), tf.float64)
        if depthwise:
            x = tf.reshape(x, (-1, kh * kw, inputs.shape[-1]))
            total = total + tf.einsum("mkc,mlc->ckl", x, x).numpy()
        else:
            total = total + tf.matmul(x, x, transpose_a=True).numpy()
        rows += int(x.shape[0])
    return total / max(rows, 1)


def _factor(moment: np.ndarray) -> np.ndarray:
    """F with F F' = moment: eigenvectors x sqrt(eigenvalues), smallest first (per matrix of a stack)."""
    values, vectors = np.linalg.eigh(moment)
    return vectors * np.sqrt(np.clip(values, 0.0, None))[..., None, :]


def _leading(factor: np.ndarray, *, energy: float) -> np.ndarray:
    """``factor`` without its smallest directions holding ``1 - energy`` of the trace (one matrix only)."""
    if factor.ndim != 2:
        return factor  # depthwise: a few directions per channel, all kept
    values = (factor ** 2).sum(axis=0)  # the eigenvalues, ascending
    dropped = np.cumsum(values) <= (1.0 - energy) * values.sum()
    return factor[:, ~dropped & (values > values.max() * 1e-12)]


def _errors(delta: np.ndarray, factor: np.ndarray, *, depthwise: bool) -> np.ndarray:
    """Per output channel, the mean squared output error of kernel error ``delta`` (K, channels)."""
    if depthwise:  # factor (C, k, r), delta (k, C)
        return (np.einsum("ckr,kc->cr", factor, delta) ** 2).sum(axis=-1)
    return ((factor.T @ delta) ** 2).sum(axis=0)


def _learn(w: np.ndarray, factor: np.ndarray, *, fixed: np.ndarray, depthwise: bool, iterations: int, tf):
    """AdaRound's soft rounding of ``w`` (in steps, (K, channels)), learned; returns 0/1 per weight (up or not)."""
    floor = np.floor(w)
    rest = np.clip(w - floor, 1e-6, 1 - 1e-6)
    v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)  # h(v0) == rest: start at the float weights
    near = np.round(w) - w
    f = tf.constant(factor, tf.float32)
    normal = float(_errors(near, factor, depthwise=depthwise).sum()) or 1.0
    return _optimise(tf.constant(v0, tf.float32), tf.constant(floor - w, tf.float32), f,
                     tf.constant(~fixed, tf.float32), normal=normal, depthwise=depthwise,
                     iterations=iterations, tf=tf).numpy() >= 0.5


def _optimise(v0, offset, factor, free, *, normal: float, depthwise: bool, iterations: int, tf):
    """Adam on the rectified-sigmoid variable: error relative to nearest rounding + annealed regulariser."""
    warm = int(iterations * WARMUP)

    def soft(v):
        return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def loss(v, step):
        delta = offset + soft(v)  # kernel error in steps (floor - w + h)
        out = tf.einsum("ckr,kc->cr", factor, delta) if depthwise else tf.matmul(factor, delta, transpose_a=True)
        error = tf.reduce_sum(tf.square(out)) / normal
        progress = tf.cast(tf.maximum(step - warm, 0), tf.float32) / float(max(iterations - warm, 1))
        beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1.0 + tf.cos(np.pi * progress))
        reg = tf.reduce_mean(free * (1.0 - tf.pow(tf.abs(2.0 * soft(v) - 1.0), beta)))
        return error + tf.where(step < warm, 0.0, REGULARISER) * reg

    @tf.function(reduce_retracing=True)
    def run(v):
        m, s = tf.zeros_like(v), tf.zeros_like(v)
        for step in tf.range(1, iterations + 1):
            with tf.GradientTape() as tape:
                tape.watch(v)
                value = loss(v, step)
            g = tape.gradient(value, v) * free
            m = 0.9 * m + 0.1 * g
            s = 0.999 * s + 0.001 * g * g
            t = tf.cast(step, tf.float32)
            v = v - LEARNING_RATE * (m / (1 - 0.9 ** t)) / (tf.sqrt(s / (1 - 0.999 ** t)) + 1e-8)
        return soft(v)

    return run(v0)


def _round_layer(conv, bn, inputs: np.ndarray, *, iterations: int, keras, tf) -> dict:
    """Choose and write back the integers of one convolution's folded kernel; returns its figures."""
    folded, gain, depthwise = _folded(conv, bn, keras)
    scale = np.abs(folded).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    w = folded / scale
    fixed = np.zeros(w.shape, dtype=bool)
    fixed[np.abs(w).argmax(axis=0), np.arange(w.shape[1])] = True  # each channel's max keeps +-127: same scale
    t0 = time.perf_counter()
    factor = _factor(_second_moment(conv, inputs, depthwise=depthwise, tf=tf))
    nearest = np.clip(np.round(w), -127, 127)
    # Learned on the directions holding all but 1e-4 of the input energy (the late 1x1 layers' steps
    # shrink several-fold); judged below on all of them.
    leading = _leading(factor, energy=ENERGY)
    up = _learn(w, leading, fixed=fixed, depthwise=depthwise, iterations=iterations, tf=tf)
    learned = np.clip(np.where(fixed, nearest, np.floor(w) + up), -127, 127)
    before = _errors(nearest - w, factor, depthwise=depthwise)
    after = _errors(learned - w, factor, depthwise=depthwise)
    worse = after > before  # a channel AdaRound did not improve keeps nearest rounding
    q = np.where(worse[None, :], nearest, learned)
    safe = np.where(np.abs(gain) < 1e-12, 1.0, gain)
    (kernel,) = conv.get_weights()
    written = np.where(np.abs(gain)[None, :] < 1e-12, kernel.reshape(w.shape), scale * q / safe[None, :])
    conv.set_weights([written.reshape(kernel.shape).astype(kernel.dtype)])
    chosen = np.where(worse, before, after)
    return {"layer": conv.name, "rank": int(leading.shape[-1]), "seconds": round(time.perf_counter() - t0, 2),
            "nearest_error": float(before.sum()), "adaround_error": float(chosen.sum()),
            "channels_kept_nearest": int(worse.sum()), "weights_changed": int((q != nearest).sum()),
            "weights": int(q.size), "integers": q.astype(np.int8)}


def _attach(conv, bn, rows: list, *, iterations: int, keras, tf) -> None:
    """Make ``conv`` (of a scratch copy) round itself on the inputs of its first call, then compute with that."""
    def rounded(inputs, compute):
        rows.append(_round_layer(conv, bn, inputs.numpy(), iterations=iterations, keras=keras, tf=tf))
        return compute(inputs)

    _on_call(conv, rounded)  # the scratch copy only: its weights are copied out after the pass


def adarounded(model, *, calibration: np.ndarray, images: int = 128, iterations: int = 1000) -> tuple[object, dict]:
    """A copy of ``model`` whose conv kernels sit on the int8 grid AdaRound chose, and what was done.

    Layers are rounded input to output; each one's input patches come from the copy with the
    earlier layers already rounded. There is no randomness: the soft rounding starts at each weight's
    fractional part and every step sees all calibration patches (through their second moment).

    Returns:
        (the copy, {"method", "layers", "calibration_images", "iterations", "output_error_vs_nearest",
        "weights_changed", "channels_kept_nearest", "seconds", "per_layer"}); ``per_layer`` rows hold
        each layer's integers under ``"integers"`` (int8, kernel layout (K, channels)) for checks,
        dropped from what is recorded by ``recorded``.
    """
    from featx_edge._tf import import_tf

    tf, keras = import_tf()
    t0 = time.perf_counter()

    # One forward pass of a scratch copy does every layer (as ``bias_correction._Rounding``): each
    # convolution, when the pass reaches it, is rounded on the inputs the pass brings (the earlier
    # layers already rounded) and the pass goes on with its rounded kernel.
    scratch, rows = _twin(model, keras), []
    for conv, bn in _conv_bn_pairs(scratch):
        if getattr(conv, "groups", 1) != 1 or getattr(conv, "depth_multiplier", 1) != 1:
            continue  # grouped or multiplied channels: the converters' channel layout is not the one modelled here
        _attach(conv, bn, rows, iterations=iterations, keras=keras, tf=tf)
    x = calibration[:images].astype(np.float32)
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # each layer's shapes trace its own optimisation: TF warns of "retracing" otherwise
    try:
        scratch(x, training=False)
    finally:
        logger.setLevel(level)
    copy = _twin(model, keras)
    copy.set_weights(scratch.get_weights())  # the same graph: the rounded kernels, without the hooks
    ratios = [r["adaround_error"] / r["nearest_error"] for r in rows if r["nearest_error"] > 0]
    info = {"method": "adaround", "layers": len(rows), "calibration_images": len(x), "iterations": iterations,
            "output_error_vs_nearest": {"median": round(float(np.median(ratios)), 4) if ratios else None,
                                        "max": round(float(max(ratios)), 4) if ratios else None},
            "weights_changed": sum(r["weights_changed"] for r in rows),
            "weights": sum(r["weights"] for r in rows),
            "channels_kept_nearest": sum(r["channels_kept_nearest"] for r in rows),
            "seconds": round(time.perf_counter() - t0, 1), "per_layer": rows}
    return copy, info


def recorded(info: dict) -> dict:
    """``info`` as the manifest and the file metadata record it: the totals, without per-layer integers."""
    return {key: value for key, value in info.items() if key != "per_layer"}
