"""A run directory, opened once and checked: its settings, splits, Keras reference and artifacts.

``export``, ``verify`` and ``bench`` reach a run only through ``Run`` (never through the
training flow). ``Run.open`` refuses a folder that is not a run, a manifest of another layout,
one with missing or mistyped entries, and paths that leave the run or the data folder, each
with one clear error. Commands that write into a run hold its lock (``rundir.locked``).

Example:
    >>> from featx_edge.training.run import Run
    >>> run = Run.open("runs/demo")  # doctest: +SKIP
    >>> run.labels, run.size, run.exported()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from featx_edge.config import RunConfig, config_from_dict
from featx_edge.data.folders import Splits, load_splits
from featx_edge.errors import ConfigError, RunDirError
from featx_edge.files.atomic import inside, sha256_file, write_json
from featx_edge.formats.registry import ordered
from featx_edge.rundir.manifest import artifact_problems, read_manifest
from featx_edge.rundir.names import EXPORT_JOURNAL, MANIFEST, SPLITS

log = logging.getLogger(__name__)


class Run:
    """A trained run directory. Build with ``Run.open(path)``; the manifest is checked on open."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._config: RunConfig | None = None
        self._splits: Splits | None = None
        self._reference = None

    @classmethod
    def open(cls, path: str | Path, *, recover: bool = False) -> Run:
        """Open ``path`` as a run; RunDirError naming the problem and the fix otherwise.

        ``recover`` (only under the run's lock): finish the bookkeeping of an export that was
        killed after its file was moved into place but before the manifest recorded it.
        """
        run = cls(Path(path), read_manifest(path))
        if recover:
            run._recover()
        return run

    def _recover(self) -> None:
        journal = self.path / EXPORT_JOURNAL
        if not journal.is_file():
            return
        try:
            entry = json.loads(journal.read_text(encoding="utf-8"))
            fmt, relpath = entry["format"], entry["path"]
            valid = isinstance(fmt, str) and inside(relpath)
        except (ValueError, KeyError, TypeError):
            valid = False
        if valid:
            path = self.path / relpath
            if path.is_file() and sha256_file(path) == entry.get("sha256"):
                log.info("recording %s: its export was interrupted after the file was written", fmt)
                self.record_artifact(fmt, path)
        journal.unlink()

    def journal(self, fmt: str, path: Path, *, sha256: str) -> Path:
        """Note that ``fmt``'s file at ``path`` is about to replace the recorded one (see ``_recover``)."""
        return write_json(self.path / EXPORT_JOURNAL, {"format": fmt, "sha256": sha256,
                                                       "path": Path(path).relative_to(self.path).as_posix()})

    # -- what the run was made with ---------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def size(self) -> int:
        """Input height and width in pixels."""
        return int(self.manifest["input"]["height"])

    @property
    def config(self) -> RunConfig:
        """The settings the run was made with (validated like a config file)."""
        if self._config is None:
            try:
                self._config = config_from_dict(self.manifest["config"], source=str(self.path / MANIFEST))
            except ConfigError as err:  # the run's record is damaged, not a setting the user gave now
                raise RunDirError(f"{str(err).rstrip('.')}; the settings recorded in the run are damaged: re-run "
                                  "`featx-edge train`.") from err
        return self._config

    @config.setter
    def config(self, config: RunConfig) -> None:
        """Use other settings for this command (recorded in the manifest only by ``save``-ing
        ``manifest["config"]``; export does so when every format was made)."""
        self._config = config

    def splits(self) -> Splits:
        """The run's train/val/test split; its data folder must still exist."""
        if self._splits is None:
            splits = load_splits(self.path / self.manifest["data"].get("splits", SPLITS))
            if not splits.root.is_dir():
                raise RunDirError(f"the run's data folder `{splits.root}` is gone; restore it "
                                  "(the splits refer to its files).")
            self._splits = splits
        return self._splits

    def reference(self):
        """The run's Keras classifier (float32), rebuilt from its config with its trained weights."""
        if self._reference is None:
            from featx_edge.training.model import build_classifier
            from featx_edge.training.train import setup_devices

            entry = self.manifest["reference"]
            weights = self.path / entry["path"]
            if not weights.is_file():
                raise RunDirError(f"`{weights}` is missing; re-run `featx-edge train`.")
            if sha256_file(weights) != entry.get("sha256"):
                raise RunDirError(f"`{weights}` does not match the checksum in {MANIFEST}; "
                                  "re-run `featx-edge train`.")
            setup_devices(mixed_precision=False)
            model_config = dataclasses.replace(self.config.model, weights="none")
            clf = build_classifier(num_classes=len(self.labels), config=model_config, weights_file=None,
                                   seed=self.config.seed)
            clf.model.load_weights(str(weights))
            self._reference = clf
        return self._reference

    # -- exported artifacts -----------------------------------------------------------------
    def exported(self) -> tuple[str, ...]:
        """The formats this run has artifacts for, in the registry's order."""
        return tuple(ordered(self.manifest.get("artifacts", {})))

    def artifact_path(self, fmt: str) -> Path:
        return self.path / self.manifest["artifacts"][fmt]["path"]

    def artifact_problems(self, fmt: str) -> list[str]:
        """What is wrong with ``fmt``'s file (empty: it is the file that was exported)."""
        return artifact_problems(self.path, self.manifest, fmt)

    def record_artifact(self, fmt: str, path: Path) -> dict:
        """Add ``fmt``'s file (path relative to the run, sha256, bytes) and save the manifest."""
        entry = {"path": Path(path).relative_to(self.path).as_posix(), "sha256": sha256_file(path),
                 "bytes": Path(path).stat().st_size}
        self.manifest.setdefault("artifacts", {})[fmt] = entry
        self.save()
        return entry

    def save(self) -> None:
        write_json(self.path / MANIFEST, self.manifest)

