"""Property-based tests of the files a user (or a damaged disk) may edit between commands: the resume
state (``state.json``), a run's ``manifest.json`` and a config (TOML).

Whatever the value, the reader returns a checked result or raises ONE specific error class
(CheckpointError / ConfigError for a state, RunDirError for a manifest, ConfigError for a config)
whose message is one line: never another exception, never a traceback. Bounded and derandomized,
as tests/test_files_fuzz.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featx_edge.config import RunConfig, config_from_dict, load_config
from featx_edge.errors import CheckpointError, ConfigError, RunDirError
from featx_edge.training.checkpoints import STATE, Checkpoints, key_settings, resume_dir, run_key

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["stage1/epoch-00002", "../../outside/victim", "/etc/passwd",
                                                    "stage1\\epoch-00002", "stage1/../../x", "", "\n", "2"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def _one_line(err: BaseException) -> None:
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert "Traceback" not in text


# --- state.json --------------------------------------------------------------------------------

CONFIG = RunConfig().to_dict()
KEY = run_key(CONFIG, splits={"train": ["a/1.png"]}, weights_sha256=None)


def _good_state() -> dict:
    history = {"loss": [0.7, 0.6], "accuracy": [0.5, 0.6]}
    return {"key": KEY, "settings": key_settings(CONFIG),
            "stages": {"stage1": {"epoch": 2, "epochs": CONFIG["train"]["epochs"], "prefix": "stage1/epoch-00002",
                                  "history": history},
                       "stage2": {"epoch": 1, "epochs": 3, "prefix": "stage2/epoch-00001",
                                  "history": {"loss": [0.5]}}}}


STATE_KEYS = [(), ("key",), ("settings",), ("stages",), ("stages", "stage1"), ("stages", "stage3"),
              ("stages", "stage1", "epoch"), ("stages", "stage1", "epochs"), ("stages", "stage1", "prefix"),
              ("stages", "stage1", "history"), ("stages", "stage1", "history", "loss"),
              ("stages", "stage2", "epoch"), ("stages", "stage2", "prefix")]


def _set(doc, key: tuple, value):
    if not key:
        return value
    node = doc
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    return doc


def _write_state(out: Path, state) -> Path:
    folder = resume_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE).write_text(json.dumps(state), encoding="utf-8")
    return folder


def _expected_state_error(key: tuple, value) -> type:
    """A string key that is not this training's is another training's checkpoint: ConfigError (say
    which settings differ); any other damage is the checkpoint's: CheckpointError."""
    return ConfigError if key == ("key",) and isinstance(value, str) and value != KEY else CheckpointError


@FUZZ
@given(key=st.sampled_from(STATE_KEYS), value=JSON)
def test_any_state_value_resumes_or_is_one_specific_error(tmp_path_factory, key, value):
    out = tmp_path_factory.mktemp("runs") / "run"
    folder = _write_state(out, _set(_good_state(), key, value))
    try:
        checkpoints = Checkpoints.open(out, key=KEY, config_dict=CONFIG, resume=True, write=True)
        for name, epochs in (("stage1", CONFIG["train"]["epochs"]), ("stage2", 3)):
            stage = checkpoints.stage(name, epochs=epochs)
            assert 0 <= stage.start_epoch <= stage.epochs  # never "remaining -97"
            if stage._prefix is not None:  # what resume reads, and deletes after the next epoch
                assert (folder / stage._prefix).resolve().is_relative_to(folder.resolve())
    except (CheckpointError, ConfigError) as err:
        assert type(err) is _expected_state_error(key, value), (key, value, err)
        _one_line(err)
        assert (folder / STATE).is_file(), "a refused resume keeps the checkpoints"


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(["", "null", "[]", "{", '{"stages": {}}', "NaN",
                                                      "[" * 5000 + "]" * 5000]))
def test_any_state_text_resumes_or_is_a_checkpoint_error(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("runs") / "run"
    folder = resume_dir(out)
    folder.mkdir(parents=True)
    (folder / STATE).write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError) as caught:
        Checkpoints.open(out, key=KEY, config_dict=CONFIG, resume=True, write=True)
    _one_line(caught.value)


def test_a_damaged_state_without_resume_starts_over(tmp_path):
    out = tmp_path / "run"
    folder = _write_state(out, _set(_good_state(), ("stages", "stage1", "prefix"), "../../outside/victim"))
    checkpoints = Checkpoints.open(out, key=KEY, config_dict=CONFIG, resume=False, write=True)
    assert checkpoints.state["stages"] == {} and not folder.exists()


# --- manifest.json -----------------------------------------------------------------------------

GOOD_MANIFEST = make_manifest(backbone={"name": "mobilenet_v2", "alpha": 0.35}, size=32,
                              config=json.loads(json.dumps(RunConfig().to_dict())))
MANIFEST_KEYS = [(), *((k,) for k in GOOD_MANIFEST), ("input", "height"), ("data", "splits"), ("reference", "path"),
                 ("artifacts", "tflite-int8"), ("artifacts", "tflite-int8", "path"), ("config", "train"),
                 ("config", "model"), ("config", "model", "backbone"), ("config", "train", "epochs"),
                 ("config", "export", "formats"), ("config", "seed"), ("config", "verify")]


@FUZZ
@given(key=st.sampled_from(MANIFEST_KEYS), value=JSON)
def test_any_manifest_value_is_opened_or_a_run_dir_error(tmp_path_factory, key, value):
    from featx_edge.training.run import Run

    manifest = json.loads(json.dumps(GOOD_MANIFEST))
    if key[:2] == ("artifacts", "tflite-int8") and len(key) == 3:
        manifest["artifacts"]["tflite-int8"] = {"path": "export/m.tflite", "sha256": "0" * 64, "bytes": 1}
    manifest = _set(manifest, key, value)
    run = tmp_path_factory.mktemp("run")
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    try:
        opened = Run.open(run)
        opened.config  # noqa: B018 - the recorded settings are validated when first read
        for fmt in opened.exported():
            opened.artifact_problems(fmt)
    except RunDirError as err:
        assert type(err) is RunDirError, err
        _one_line(err)


def test_a_deeply_nested_manifest_is_a_run_dir_error(tmp_path):
    from featx_edge.training.run import Run

    (tmp_path / "manifest.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RunDirError) as caught:
        Run.open(tmp_path)
    _one_line(caught.value)


# --- config (TOML) -----------------------------------------------------------------------------

TOML_SCALARS = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20)
                | st.sampled_from(["all", "none", "tflite-int8", "mobilenet_v2", "0.35", "sample", "nan", "a\nb", "\r",
                                   "\x1b[31m", "x\u2028y"]))
TEXT = st.text(max_size=8) | st.sampled_from(["a\nb", "\r", "\x1b[2J", "\u2028"])
TOML_VALUES = st.recursive(TOML_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
SECTION_KEYS = {"data": ["path", "val_fraction", "test_fraction"],
                "model": ["backbone", "alpha", "weights", "image_size", "head_units", "dropout"],
                "train": ["epochs", "batch_size", "learning_rate", "fine_tune_epochs", "unfreeze_top", "strategy",
                          "mixed_precision", "feature_cache", "augment_views", "augment", "qat_epochs"],
                "export": ["formats", "calibration_images", "onnx_calibration", "int8_budget", "target"],
                "verify": ["tflite-int8", "onnx-float32"], "extra": ["x"]}


def _toml(value) -> str:
    """``value`` as a TOML value (inline tables and arrays); no TOML writer is installed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string (escapes control characters)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(section=st.sampled_from(sorted(SECTION_KEYS)) | TEXT, data=st.data(), value=TOML_VALUES)
def test_any_config_value_loads_or_is_a_config_error(tmp_path_factory, section, data, value):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    keys = SECTION_KEYS.get(section, ["x"])
    key = data.draw(st.sampled_from(keys) | TEXT)
    path.write_text(f"seed = 0\n[{json.dumps(section)}]\n{json.dumps(key)} = {_toml(value)}\n", encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as err:
        assert type(err) is ConfigError, err
        _one_line(err)
        return
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config  # what a manifest records reloads


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_config_bytes_load_or_are_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as err:
        assert type(err) is ConfigError, err
        _one_line(err)


@pytest.mark.parametrize("text", ["a = " + "[" * 50_000 + "]" * 50_000, "a = " + "{b = " * 5000 + "1" + "}" * 5000,
                                  "[" + ".".join(["t"] * 50_000) + "]"])
def test_deeply_nested_toml_is_a_config_error(tmp_path, text):
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="deep.toml") as caught:
        load_config(path)
    _one_line(caught.value)
