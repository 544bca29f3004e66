"""Pretrain a backbone from scratch on a source dataset and save it for ``--weights PATH``.

For domains ImageNet fits poorly, or machines that cannot download ImageNet weights: train
the whole network on a source task, then freeze it and transfer to the target task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from featx_edge.backbones.registry import get_backbone
from featx_edge.config import ModelConfig, TrainConfig
from featx_edge.data.folders import load_images, scan_folder, split_folder
from featx_edge.data.sample import resolve_data
from featx_edge.files.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

# Pretraining augmentation. Small datasets with flat regions (scans, digits on a plain
# background) otherwise give BatchNorm channels of near-zero variance, and features so
# sensitive that half a grey level of noise flips predictions (and int8 cannot keep up).
AUGMENT_TRANSLATION = 0.1  # fraction of height/width
AUGMENT_NOISE = 20.0  # stddev in grey levels (0..255)

# Keras MobileNet/EfficientNet BatchNorm uses momentum 0.99-0.999: after a few hundred steps
# from scratch its moving statistics are still near their initial values and inference-mode
# outputs are useless. A faster average makes short pretraining runs usable.
PRETRAIN_BN_MOMENTUM = 0.9


def pretrain(*, data: str, out: str | Path, model: ModelConfig, train: TrainConfig, seed: int = 0,
             val_fraction: float = 0.15, test_fraction: float = 0.15) -> dict:
    """Train ``model.backbone`` from scratch on ``data`` and save its no-top weights to ``out``.

    ``data="sample"`` uses the sample data's source classes (digits 0-4), disjoint from the
    classes ``--data sample`` trains on. The split is the one ``featx-edge train`` makes with
    the same seed and fractions, so a run on the same folder tests on images the backbone
    never saw. Writes ``out`` (Keras .h5 weights of the backbone
    without its top) and ``out + ".json"`` (what it was trained on, and how well).

    Example:
        >>> pretrain(data="sample", out="pretrained.h5", seed=0,  # doctest: +SKIP
        ...          model=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=96, weights="none"), train=TrainConfig(epochs=8))
    """
    from featx_edge._tf import import_tf
    from featx_edge.training.train import array_dataset, fit, setup_devices

    _, keras = import_tf()
    out = Path(out)
    if out.suffix != ".h5":
        from featx_edge.errors import ConfigError

        raise ConfigError(f"`--out` for pretrain must end in `.h5` (Keras weights); received `{out}`.")
    spec = get_backbone(model.backbone)
    size = model.input_size
    root = resolve_data(data, part="source")
    folder = scan_folder(root)
    splits = split_folder(folder, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    setup_devices(mixed_precision=train.mixed_precision)
    # The whole backbone is pretrained and saved, whatever cut a config names for the runs that use it.
    model = dataclasses.replace(model, weights="none", head_units=0, cut_at=None)
    clf = _scratch_classifier(keras, model=model, num_classes=len(splits.classes), seed=seed)
    x_train = load_images(splits.root, splits.train, size=size)
    x_val = load_images(splits.root, splits.val, size=size)
    x_test = load_images(splits.root, splits.test, size=size)
    y_train, y_val, y_test = splits.labels("train"), splits.labels("val"), splits.labels("test")
    data, steps = array_dataset(x_train, y_train, batch_size=train.batch_size, seed=seed, epochs=train.epochs,
                                augment=_augmenter(keras, seed=seed))
    result = fit(clf.model, data, epochs=train.epochs, learning_rate=train.learning_rate,
                 val_data=(x_val.astype(np.float32), y_val), steps_per_epoch=steps)
    test_acc = float(np.mean(clf.model.predict(x_test.astype(np.float32), verbose=0).argmax(1) == y_test))

    _save_backbone(clf, spec=spec, model=model, out=out)
    info = {
        "backbone": spec.name, "alpha": model.alpha, "image_size": size, "data": str(root),
        "classes": list(splits.classes), "test_files": list(splits.test), "epochs": train.epochs, "seconds": round(result.seconds, 2),
        "source_test_accuracy": test_acc, "seed": seed,
        "use": f"--backbone {spec.name}" + (f" --alpha {model.alpha}" if model.alpha else "")
               + f" --image-size {size} --weights {out}",
    }
    write_json(Path(str(out) + ".json"), info)
    log.info(json.dumps({k: v for k, v in info.items() if k != "test_files"}, indent=2))
    return info


def _scratch_classifier(keras, *, model: ModelConfig, num_classes: int, seed: int):
    """The classifier to pretrain: its backbone trainable, BatchNorm statistics that follow a short training."""
    from featx_edge.training.model import build_classifier

    clf = build_classifier(num_classes=num_classes, config=model, weights_file=None, seed=seed,
                           trainable_backbone=True)
    for layer in clf.backbone_layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = PRETRAIN_BN_MOMENTUM
    return clf


def _augmenter(keras, *, seed: int):
    """Small shifts and noise, applied to every training batch of the pretraining."""
    return keras.Sequential([
        keras.layers.RandomTranslation(AUGMENT_TRANSLATION, AUGMENT_TRANSLATION, fill_mode="nearest", seed=seed),
        keras.layers.GaussianNoise(AUGMENT_NOISE, seed=seed),
    ], name="pretrain_augment")


def _save_backbone(clf, *, spec, model: ModelConfig, out: Path) -> None:
    """Write the trained backbone alone (no top) to ``out``, atomically: the file `--weights PATH` loads."""
    from featx_edge.training.model import build_backbone, copy_weights

    standalone = build_backbone(spec, alpha=model.alpha, size=model.input_size)
    copy_weights(clf.backbone_layers, standalone.layers, what="the pretrained backbone")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        standalone.save_weights(str(tmp))
