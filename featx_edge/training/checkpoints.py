"""Resumable training: per-epoch checkpoints beside the run, and ``--resume`` from them.

A training run of ``OUT`` keeps its checkpoints in ``.OUT.featx-edge.resume/`` beside ``OUT``
(next to the lock file, ``.OUT.featx-edge.lock``), not in the staging folder, which is deleted
when training fails. After every epoch of every stage it writes the model's weights, the
optimizer's state (Adam's moments and step count) and the epoch reached, then records them in
``state.json``; a run that completes removes the folder.

``state.json`` carries a key: a hash of the settings that decide the result (data, model and
training settings, seed), the split and the backbone weights' sha256. Left out: the export and
verify settings, ``train.feature_cache`` and ``train.strategy`` (a run may resume under another
strategy). ``--resume`` continues only a run with the same key, and says which settings differ
otherwise. Without ``--resume`` a new run starts over and replaces an earlier run's checkpoints.

What is restored is exact: the next epoch sees the batches it would have seen (the data
pipeline is rebuilt from the resumed epoch) and the same optimizer state, so a resumed run
ends with the weights of an uninterrupted one, except for dropout: its random masks are drawn
by TensorFlow's stateful random ops, whose state is not in the checkpoint, so after a resume
(with ``dropout`` > 0) they are fresh draws of the same distribution, a difference within
training noise.

In a multi-worker run the chief writes the checkpoints; the other workers save theirs to a
private temporary folder that is removed at once, and on ``--resume`` they restore the chief's,
so ``OUT``'s parent folder must then be storage every worker sees at the same path.

Test hook: ``FEATX_EDGE_TEST_INTERRUPT_AFTER_EPOCH=K`` raises ``KeyboardInterrupt`` after the
K-th epoch of the run (counted across stages: fine-tuning epochs follow the head's) has been
checkpointed, as a Ctrl-C would. It is read only by ``interrupt_after`` and is for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from featx_edge.errors import CheckpointError, ConfigError, RunDirError
from featx_edge.files.atomic import beside, inside, write_json

log = logging.getLogger(__name__)

RESUME_SUFFIX = ".featx-edge.resume"
STATE = "state.json"
INTERRUPT_ENV = "FEATX_EDGE_TEST_INTERRUPT_AFTER_EPOCH"
# Settings that do not change the trained weights (where features are cached is not what they are).
_NOT_IN_KEY = {"strategy", "qat_epochs", "qat_learning_rate", "feature_cache"}
STAGES = ("stage1", "stage2")
"""The stages a state may record (``Checkpoints.stage``'s names): head on features, fine-tuning."""


def resume_dir(out: str | Path) -> Path:
    """``OUT``'s checkpoint folder: beside it, so it outlives the staging folder of a failed run."""
    return beside(out, RESUME_SUFFIX)


def interrupt_after() -> int | None:
    """The test hook's epoch (``FEATX_EDGE_TEST_INTERRUPT_AFTER_EPOCH``), or None when unset."""
    raw = os.environ.get(INTERRUPT_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"`{INTERRUPT_ENV}` (a test hook) must be an integer >= 1; received `{raw}`. "
                          "Unset it outside tests.")
    return int(raw)


def key_settings(config_dict: dict) -> dict:
    """The part of a run's config that decides its trained weights (what the key hashes)."""
    train = {k: v for k, v in config_dict["train"].items() if k not in _NOT_IN_KEY}
    settings = {"data": config_dict["data"], "model": config_dict["model"], "train": train, "seed": config_dict["seed"]}
    return json.loads(json.dumps(settings, default=str))  # as state.json holds it (tuples become lists)


def run_key(config_dict: dict, *, splits: dict, weights_sha256: str | None) -> str:
    """Hash of the settings, the split and the backbone weights a checkpoint belongs to."""
    doc = {"settings": key_settings(config_dict), "splits": splits, "weights_sha256": weights_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


class Checkpoints:
    """The checkpoints of one training of ``OUT``. Open with ``Checkpoints.open``."""

    def __init__(self, folder: Path, *, key: str, settings: dict, state: dict, write: bool) -> None:
        self.folder = folder
        self.key = key
        self.settings = settings
        self.state = state
        self.write = write  # False on a non-chief worker: it reads the chief's, writes nothing here

    @classmethod
    def open(cls, out: str | Path, *, key: str, config_dict: dict, resume: bool, write: bool) -> Checkpoints:
        """Checkpoints for a run of ``out``: the earlier ones with ``resume``, else a fresh start.

        Raises:
            RunDirError: ``resume`` and there is nothing to resume.
            CheckpointError: ``resume`` and ``state.json`` is damaged or edited.
            ConfigError: ``resume`` and the checkpoints were made with other settings or data.
        """
        folder = resume_dir(out)
        settings = key_settings(config_dict)
        state_file = folder / STATE
        try:
            old = _read_state(state_file)
        except CheckpointError:
            if resume:  # a damaged state is never resumed from
                raise
            log.warning("starting over: %s is damaged", state_file)
            old = None
        if resume:
            if old is None:
                where = "" if write else (" (a non-chief worker restores the chief's checkpoints: `--out`'s parent "
                                          "folder must be storage every worker sees at the same path)")
                raise RunDirError(f"`--resume`: there is no checkpoint of an interrupted training of `{out}` in "
                                  f"`{folder}`{where}. Run without `--resume` to train from the start.")
            if old.get("key") != key:
                changed = _differences(old.get("settings", {}), settings) or [
                    "the data's split or the backbone weights file changed"]
                raise ConfigError(f"`--resume`: the checkpoint in `{folder}` belongs to a training with other "
                                  f"settings or data ({'; '.join(changed)}). Resume with the same settings, or run "
                                  "without `--resume` to start over.")
            log.info("resuming from the checkpoints in %s (%s)", folder, _progress(old))
            return cls(folder, key=key, settings=settings, state=old, write=write)
        if write and folder.exists():
            if old is not None:
                log.warning("starting over: the checkpoints of an interrupted training (%s) in %s are replaced; "
                            "pass `--resume` to continue one instead", _progress(old), folder)
            shutil.rmtree(folder)
        return cls(folder, key=key, settings=settings, state={"key": key, "settings": settings, "stages": {}},
                   write=write)

    def stage(self, name: str, *, epochs: int, offset: int = 0) -> StageCheckpoint:
        """The checkpoint of one stage (``stage1``, ``stage2``) of ``epochs`` epochs.

        ``offset``: epochs of the stages before it (the interruption hook counts across stages).
        """
        saved = self.state["stages"].get(name, {})
        if saved and saved.get("epochs") != epochs:  # the key covers epochs; a hand-edited state is refused
            raise CheckpointError(f"`{self.folder / STATE}` records {saved.get('epochs')} epochs for {name}, not "
                                  f"{epochs}; remove `{self.folder}` and train without `--resume`.")
        return StageCheckpoint(self, name, epochs=epochs, offset=offset)

    def save_state(self) -> None:
        if self.write:
            write_json(self.folder / STATE, self.state)

    def remove(self) -> None:
        """Delete the checkpoints (the run completed)."""
        if self.write:
            shutil.rmtree(self.folder, ignore_errors=True)


def note_resumable(out: str | Path) -> None:
    """After a failed or interrupted training of ``out``: say how to continue it, if it can be."""
    try:
        state = _read_state(resume_dir(out) / STATE)
    except CheckpointError:  # damaged: nothing to continue from
        return
    if state is not None and state["stages"]:
        log.warning("checkpoints of this training (%s) are in %s: the same command with `--resume` continues "
                    "from there", _progress(state), resume_dir(out))


def remove_checkpoints(out: str | Path) -> None:
    """Delete ``out``'s checkpoint folder, if any: its training completed."""
    shutil.rmtree(resume_dir(out), ignore_errors=True)


class StageCheckpoint:
    """Save and restore one stage's model + optimizer + epoch; see the module docstring."""

    def __init__(self, checkpoints: Checkpoints, name: str, *, epochs: int, offset: int) -> None:
        self.checkpoints = checkpoints
        self.name = name
        self.epochs = epochs
        self.offset = offset
        saved = checkpoints.state["stages"].get(name, {})
        self.start_epoch: int = int(saved.get("epoch", 0))
        self.history: dict[str, list[float]] = {k: list(v) for k, v in saved.get("history", {}).items()}
        self._prefix: str | None = saved.get("prefix")
        self._tracker = None

    @property
    def done(self) -> bool:
        return self.start_epoch >= self.epochs

    def attach(self, model) -> None:
        """Track ``model`` and its (compiled) optimizer; restore them when resuming.

        Call after ``model.compile`` and under the model's strategy scope: the optimizer's slot
        variables are built here so the restore fills them now, not lazily at the first step.
        """
        from featx_edge._tf import import_tf

        tf, _ = import_tf()
        model.optimizer.build(model.trainable_variables)
        self._tracker = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        if self._prefix is not None:
            path = self.checkpoints.folder / self._prefix
            try:
                self._tracker.read(str(path)).assert_existing_objects_matched()
            except (tf.errors.OpError, IndexError, ValueError, AssertionError) as err:  # TF's readers raise these
                raise CheckpointError(f"`--resume`: the checkpoint `{path}` (its .index and .data files) is "
                                      f"missing, truncated or damaged ({_first_line(err)}); run without `--resume` "
                                      "to start over.") from err
            log.info("%s: restored epoch %d of %d; training the remaining %d", self.name, self.start_epoch,
                     self.epochs, self.epochs - self.start_epoch)

    def callback(self):
        """A Keras callback that checkpoints after every epoch (and applies the interruption hook)."""
        from featx_edge._tf import import_tf

        _, keras = import_tf()
        stage = self
        interrupt = interrupt_after()

        class _Save(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                stage.save(epoch + 1, logs or {})
                if interrupt is not None and stage.offset + epoch + 1 == interrupt:
                    raise KeyboardInterrupt(f"{INTERRUPT_ENV}={interrupt}: interrupted after epoch {interrupt} "
                                            "(test hook)")

        return _Save()

    def save(self, epoch: int, logs: dict[str, Any]) -> None:
        """Write the state after ``epoch`` (1-based) epochs, then record it; older files go after."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        prefix = _prefix(self.name, epoch)
        if not self.checkpoints.write:  # a non-chief worker saves in step with the chief, then discards it
            scratch = tempfile.mkdtemp(prefix="featx-edge-worker-ckpt-")
            try:
                self._tracker.write(os.path.join(scratch, "ckpt"))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return
        self._tracker.write(str(self.checkpoints.folder / prefix))
        old, self._prefix = self._prefix, prefix
        self.checkpoints.state["stages"][self.name] = {
            "epoch": epoch, "epochs": self.epochs, "prefix": prefix, "history": self.history}
        self.checkpoints.save_state()  # the switch to the new files is this one atomic rename
        if old is not None and old != prefix:
            for path in (self.checkpoints.folder / old).parent.glob(Path(old).name + ".*"):
                path.unlink(missing_ok=True)


def _read_state(path: Path) -> dict | None:
    """The checked state in ``path``; None when there is none.

    Raises:
        CheckpointError: the file is unreadable, not JSON, or a value has the wrong type or range
            (a hand-edited or damaged state), naming the first problem.
    """
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    except (ValueError, RecursionError) as err:  # JSON and UTF-8 errors are ValueErrors
        problem = f"is not valid JSON ({_first_line(err)})"
    else:
        problem = _state_problem(state, folder=path.parent)
    if problem:
        raise CheckpointError(f"`{path}` {problem}; run without `--resume` to start over (that replaces these "
                              "checkpoints).")
    return state


def _state_problem(state: Any, *, folder: Path) -> str | None:
    """What is wrong with a parsed ``state.json`` (None: nothing). Every value is typed and in range,
    and every checkpoint it names lies inside ``folder``: resume reads and deletes those files."""
    if not isinstance(state, dict):
        return f"holds a JSON {type(state).__name__}, not an object"
    for key, kind in (("key", str), ("settings", dict), ("stages", dict)):
        if not isinstance(state.get(key), kind):
            return f"is damaged: `{key}` is missing or not a JSON {'string' if kind is str else 'object'}"
    for name, entry in state["stages"].items():
        problem = (f"`stages` names {name!r}, not one of {', '.join(STAGES)}" if name not in STAGES
                   else _stage_problem(name, entry, folder=folder))
        if problem:
            return f"is damaged: {problem}"
    return None


def _stage_problem(name: str, entry: Any, *, folder: Path) -> str | None:
    """What is wrong with one stage's entry of ``state.json`` (None: nothing)."""
    if not isinstance(entry, dict):
        return f"`stages.{name}` is not a JSON object"
    epochs, epoch = entry.get("epochs"), entry.get("epoch")
    if not _is_int(epochs) or epochs < 1:
        return f"`stages.{name}.epochs` ({epochs!r}) is not an integer >= 1"
    if not _is_int(epoch) or not 1 <= epoch <= epochs:
        return f"`stages.{name}.epoch` ({epoch!r}) is not an integer from 1 to its {epochs} epochs"
    prefix, expected = entry.get("prefix"), _prefix(name, epoch)
    # Only the name save() writes: anything else could point outside the folder (`../../x`).
    if prefix != expected or not inside(prefix) or not (folder / prefix).resolve().is_relative_to(folder.resolve()):
        return f"`stages.{name}.prefix` ({prefix!r}) is not `{expected}`, the checkpoint of that epoch in this folder"
    history = entry.get("history")
    if not isinstance(history, dict):
        return f"`stages.{name}.history` is not a JSON object"
    for metric, values in history.items():
        if (not isinstance(values, list) or len(values) > epoch
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            return f"`stages.{name}.history.{metric}` is not a list of at most {epoch} numbers"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prefix(stage: str, epoch: int) -> str:
    """Where a stage's checkpoint after ``epoch`` epochs lives, relative to the checkpoint folder."""
    return f"{stage}/epoch-{epoch:05d}"


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _progress(state: dict) -> str:
    parts = [f"{name} epoch {entry.get('epoch')} of {entry.get('epochs')}"
             for name, entry in state.get("stages", {}).items()]
    return ", ".join(parts) or "no epoch completed"
