"""Reading a trained run directory: its settings, its splits and its Keras reference.

``verify``, ``bench`` and ``export`` reach a run through here (not through the training flow);
every manifest is checked on read (``rundir.read_manifest``: layout version, required entries).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featx_edge.config import RunConfig, config_from_dict
from featx_edge.data import Splits, load_splits
from featx_edge.errors import RunDirError
from featx_edge.rundir import MANIFEST, read_manifest, sha256_file, write_json


def run_config(manifest: dict) -> RunConfig:
    """The settings the run was made with (validated like a config file)."""
    return config_from_dict(manifest["config"], source=MANIFEST)


def update_run_config(run: str | Path, change) -> RunConfig:
    """Apply ``change(config) -> config`` to the settings recorded in the run's manifest."""
    manifest = read_manifest(run)
    config = change(run_config(manifest))
    manifest["config"] = config.to_dict()
    write_json(Path(run) / MANIFEST, manifest)
    return config


def load_reference(run: str | Path, manifest: dict | None = None):
    """Rebuild the run's Keras classifier (float32) and load its trained weights."""
    from featx_edge.model import build_classifier
    from featx_edge.train import setup_devices

    run = Path(run)
    manifest = manifest or read_manifest(run)
    weights = run / manifest["reference"]["path"]
    if not weights.is_file():
        raise RunDirError(f"`{weights}` is missing; re-run `featx-edge train`.")
    if sha256_file(weights) != manifest["reference"]["sha256"]:
        raise RunDirError(f"`{weights}` does not match the checksum in {MANIFEST}; re-run `featx-edge train`.")
    config = run_config(manifest)
    setup_devices(mixed_precision=False)
    model_config = dataclasses.replace(config.model, weights="none")
    clf = build_classifier(num_classes=len(manifest["labels"]), config=model_config, weights_file=None,
                           seed=config.seed)
    clf.model.load_weights(str(weights))
    return clf


def load_run_splits(run: Path, manifest: dict) -> Splits:
    """The run's train/val/test split; its data folder must still exist."""
    splits = load_splits(Path(run) / manifest["data"].get("splits", "splits.json"))
    if not splits.root.is_dir():
        raise RunDirError(
            f"the run's data folder `{splits.root}` is gone; restore it (the splits refer to its files)."
        )
    return splits
