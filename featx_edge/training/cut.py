"""Cutting the frozen backbone at an earlier layer (``--cut-at LAYER``, config ``model.cut_at``).

Features from an earlier layer of the same ImageNet backbone, pooled as the full backbone's are,
make a model a fraction of the size: the layers after the cut are not in the graph, so neither
their weights (flash) nor their activations (RAM) are in the exported model. Any layer of the
backbone with a 4-D output (height, width, channels) can be the cut; the natural ones are the
block outputs (the last layer of each block, after its residual add), and among them the stage
outputs (the last block at each resolution and width), which ``featx-edge fit`` searches.

Block names come from the Keras applications' and EfficientNet-Lite's own naming (``block_3``,
``block2b``, ``conv3_block1``, ``expanded_conv_4``): a layer's block is the name up to its block
number. Layer order is the functional graph's topological order, so the last layer of a block is
its output. Functions here take a built Keras backbone; ``training.model`` builds one from a
config (``check_cut``, ``stage_outputs``).

Example:
    >>> from featx_edge.config import ModelConfig
    >>> from featx_edge.training.model import stage_outputs
    >>> [p.name for p in stage_outputs(ModelConfig(backbone="efficientnet_lite0", weights="none"))][-3:]  # doctest: +SKIP
    ['block14_add', 'block15_project_bn', 'top_activation']
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from featx_edge.config import ModelConfig
from featx_edge.errors import ConfigError

_BLOCK = re.compile(r"^(.*?(?:block_?\d+[a-z]?|expanded_conv(?:_\d+)?))(?:[_/]|$)")
SHOWN_CHOICES = 8
"""Cut points named in the error for an unknown layer (the stage outputs, deepest last)."""


@dataclass(frozen=True)
class CutPoint:
    """A layer the backbone can be cut at, with its output's (height, width, channels) at the input size."""

    name: str
    shape: tuple[int, int, int]


def block_outputs(backbone) -> list[CutPoint]:
    """The last layer of each block of ``backbone`` (a Keras model), input to output, then its final layer."""
    last: dict[str, object] = {}
    for layer in backbone.layers:
        match = _BLOCK.match(layer.name)
        if match and _is_map(layer):
            last.pop(match.group(1), None)  # re-insert: the dict keeps blocks in order of their last layer
            last[match.group(1)] = layer
    points = [CutPoint(layer.name, _shape(layer)) for layer in last.values()]
    final = backbone.layers[-1]
    if _is_map(final) and (not points or points[-1].name != final.name):
        points.append(CutPoint(final.name, _shape(final)))
    return points


def stages(points: list[CutPoint]) -> list[CutPoint]:
    """The stage outputs among block outputs: where the next one changes resolution or width, and the last."""
    return [p for i, p in enumerate(points) if i == len(points) - 1 or points[i + 1].shape != p.shape]


def cut_tensor(backbone, config: ModelConfig):
    """The output of ``config.cut_at`` in ``backbone`` (the whole backbone's output when None).

    Raises:
        ConfigError: one line naming the backbone, the layer received and some valid cut points.
    """
    if config.cut_at is None:
        return backbone.output
    layer = next((layer for layer in backbone.layers if layer.name == config.cut_at), None)
    if layer is None or layer.name.startswith("featx_preprocess") or not _is_map(layer):
        raise unknown_cut(config, backbone=backbone)
    return layer.output


def check_names(backbone, config: ModelConfig, names) -> None:
    """Refuse the first of ``names`` (None: the whole backbone) that is not a layer of ``backbone`` with a 4-D output."""
    valid = {layer.name for layer in backbone.layers[1:] if _is_map(layer)}
    for name in names:
        if name is not None and name not in valid:
            raise unknown_cut(dataclasses.replace(config, cut_at=name), backbone=backbone)


def unknown_cut(config: ModelConfig, *, backbone) -> ConfigError:
    points = block_outputs(backbone)
    shown = [p.name for p in stages(points)]
    other = [p.name for p in points if p.name not in shown] or shown
    return ConfigError(
        f"`--cut-at` (`cut_at`) must name a layer of {config.backbone}'s backbone with a 4-D output; received "
        f"`{config.cut_at}`. Stage outputs, input to output: {', '.join(shown[-SHOWN_CHOICES:])} (any of its "
        f"{len(points)} block outputs, e.g. {other[len(other) // 2]}, works too).")


def _is_map(layer) -> bool:
    shape = getattr(layer, "output_shape", None)
    return isinstance(shape, tuple) and len(shape) == 4


def _shape(layer) -> tuple[int, int, int]:
    return tuple(int(d) for d in layer.output_shape[1:])
