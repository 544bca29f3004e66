import dataclasses
import math
import re

import pytest

from featx_edge.config import DataConfig, ExportConfig, ModelConfig, RunConfig, TrainConfig, load_config
from featx_edge.errors import ConfigError
from featx_edge.formats.registry import FORMATS, artifact_filename, parse_formats


def test_defaults_are_valid_and_frozen():
    cfg = RunConfig()
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.alpha is None and cfg.model.weights == "imagenet"
    assert cfg.export.formats == FORMATS
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "mobilenet2"}, "`--backbone` must be one of mobilenet_v2"),
    ({"backbone": "mobilenet_v2", "alpha": 0.6}, "`--alpha` for `mobilenet_v2` must be one of"),
    ({"backbone": "resnet50", "alpha": 0.5}, "has no width multiplier"),
    ({"image_size": 16}, "`image_size` (`--image-size`) for `efficientnet_lite0` must be an integer from 32"),
    ({"head_units": -1}, "`head_units` must be an integer from 0 to 8192"),
])
def test_model_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        ModelConfig(**kwargs)
    if "backbone" in kwargs and kwargs["backbone"] == "mobilenet2":
        assert "featx-edge backbones" in str(err.value)


def test_train_and_data_ranges():
    with pytest.raises(ConfigError, match="`epochs` must be an integer from 1 to 10000"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="`test_fraction` must be a number in"):
        DataConfig(test_fraction=0.9)


def test_formats_parse_and_reject():
    assert parse_formats("all") == FORMATS
    assert parse_formats("tflite-int8, onnx-float32,tflite-int8") == ("tflite-int8", "onnx-float32")
    with pytest.raises(ConfigError, match="unknown export format `tflite-int4`"):
        parse_formats("tflite-int4")
    assert artifact_filename("tflite-int8") == "model.tflite-int8.tflite"
    assert artifact_filename("onnx-float32") == "model.onnx-float32.onnx"
    assert ExportConfig(formats="onnx-float32").formats == ("onnx-float32",)


def test_toml_round_trip_and_unknown_keys(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('seed = 7\n[model]\nbackbone = "vgg16"\nhead_units = 1024\n[train]\nepochs = 3\n'
                    '[export]\nformats = "tflite-int8"\n')
    cfg = load_config(path)
    assert (cfg.seed, cfg.model.backbone, cfg.model.head_units, cfg.train.epochs) == (7, "vgg16", 1024, 3)
    assert cfg.export.formats == ("tflite-int8",)
    path.write_text("[model]\nbackbon = 'vgg16'\n")
    with pytest.raises(ConfigError, match="unknown key.*backbon"):
        load_config(path)
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_shipped_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))
    assert examples, "examples/ should ship at least one config"
    for path in examples:
        load_config(path)
    seed = load_config(Path(__file__).parents[1] / "examples" / "vgg16_seed.toml")
    assert seed.model.backbone == "vgg16" and seed.model.head_units == 1024


def test_comma_separated_integers():
    from featx_edge.config import parse_int_list

    assert parse_int_list("threads", "1, 4,") == (1, 4)
    for bad in ("", "one,2", " , "):
        with pytest.raises(ConfigError, match="`--threads` takes comma-separated integers"):
            parse_int_list("threads", bad)


# --- strict types and ranges for every setting, checked on creation --------------------------------

BAD_SETTINGS = [
    # (section, key, value, what the message must say)
    ("train", "epochs", True, "`epochs` must be an integer from 1 to 10000; received `True` (bool)"),
    ("train", "epochs", 10.0, "`epochs` must be an integer from 1 to 10000; received `10.0` (float)"),
    ("train", "epochs", "10", "`epochs` must be an integer from 1 to 10000; received `'10'` (str)"),
    ("train", "epochs", 10_001, "`epochs` must be an integer from 1 to 10000; received `10001`"),
    ("train", "batch_size", False, "`batch_size` must be an integer from 1 to 4096; received `False` (bool)"),
    ("train", "batch_size", 0, "`batch_size` must be an integer from 1 to 4096; received `0`"),
    ("train", "batch_size", 1_000_000, "`batch_size` must be an integer from 1 to 4096"),
    ("train", "fine_tune_epochs", -1, "`fine_tune_epochs` must be an integer from 0 to 10000"),
    ("train", "unfreeze_top", 2.5, "`unfreeze_top` must be an integer from 0 to 1000; received `2.5` (float)"),
    ("train", "unfreeze_top", 5000, "`unfreeze_top` must be an integer from 0 to 1000"),
    ("train", "qat_epochs", True, "`qat_epochs` must be an integer from 0 to 1000; received `True` (bool)"),
    ("train", "learning_rate", 0.0, "`learning_rate` must be a number in (0.0, 1.0]; received `0.0`"),
    ("train", "learning_rate", -0.1, "`learning_rate` must be a number in (0.0, 1.0]"),
    ("train", "learning_rate", True, "`learning_rate` must be a number in (0.0, 1.0]; received `True` (bool)"),
    ("train", "learning_rate", "1e-3", "`learning_rate` must be a number in (0.0, 1.0]; received `'1e-3'` (str)"),
    ("train", "learning_rate", float("nan"), "`learning_rate` must be a number in (0.0, 1.0]; received `nan`"),
    ("train", "fine_tune_learning_rate", 2.0, "`fine_tune_learning_rate` must be a number in (0.0, 1.0]"),
    ("train", "qat_learning_rate", float("inf"), "`qat_learning_rate` must be a number in (0.0, 1.0]"),
    ("train", "mixed_precision", "yes", "`mixed_precision` must be true or false; received `'yes'` (str)"),
    ("train", "mixed_precision", 1, "`mixed_precision` must be true or false; received `1` (int)"),
    ("data", "path", 5, "`path` must be a folder path (a string), `sample` or `sample:PART`; received `5` (int)"),
    ("data", "path", "", "`path` must be a folder path"),
    ("data", "val_fraction", True, "`val_fraction` must be a number in (0.0, 0.5]; received `True` (bool)"),
    ("data", "test_fraction", 0.0, "`test_fraction` must be a number in (0.0, 0.5]"),
    ("model", "backbone", 5, "`backbone` must be a backbone name"),
    ("model", "alpha", True, "`alpha` must be a number; received `True` (bool)"),
    ("model", "image_size", 100_000, ("`image_size` (`--image-size`) for `efficientnet_lite0` must be an integer "
                                      "from 32 to 1024; received `100000`")),
    ("model", "image_size", 16, "`image_size` (`--image-size`) for `efficientnet_lite0` must be an integer from 32"),
    ("model", "image_size", 96.0, "must be an integer from 32 to 1024; received `96.0` (float)"),
    ("model", "image_size", True, "must be an integer from 32 to 1024; received `True` (bool)"),
    ("model", "head_units", True, "`head_units` must be an integer from 0 to 8192; received `True` (bool)"),
    ("model", "head_units", 10**6, "`head_units` must be an integer from 0 to 8192"),
    ("model", "dropout", 0.95, "`dropout` must be a number in [0.0, 0.9]; received `0.95`"),
    ("model", "dropout", "0.2", "`dropout` must be a number in [0.0, 0.9]; received `'0.2'` (str)"),
    ("model", "weights", 5, "`weights` must be `imagenet`, `none` or a path to a weights file; received `5` (int)"),
    ("export", "formats", 5, ("`formats` must be `all`, a comma-separated string or a list of format names; "
                              "received `5` (int)")),
    ("export", "formats", ["tflite-int8", 3], "`formats` must be `all`, a comma-separated string or a list"),
    ("export", "calibration_images", 0, "`calibration_images` must be an integer from 1 to 100000; received `0`"),
    ("export", "calibration_images", 200.0, "`calibration_images` must be an integer from 1 to 100000"),
    ("export", "reference_images", 0, "`reference_images` must be an integer from 1 to 1000; received `0`"),
    ("export", "reference_images", True, "`reference_images` must be an integer from 1 to 1000"),
    ("export", "selective_float_layers", 0, "`selective_float_layers` must be an integer from 1 to 1000"),
    ("export", "int8_budget", True, "`int8_budget` must be a number in [0.0, 100.0]; received `True` (bool)"),
    ("export", "int8_budget", 101, "`int8_budget` must be a number in [0.0, 100.0]; received `101`"),
    ("export", "onnx_calibration", 1, "`onnx_calibration` must be one of minmax"),
    ("export", "bias_correction", "no", "`bias_correction` must be true, false or \"auto\"; received `'no'` (str)"),
]
_CLASSES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "export": ExportConfig}


@pytest.mark.parametrize("section, key, value, message", BAD_SETTINGS, ids=lambda v: repr(v)[:30])
def test_every_setting_is_checked_on_creation(section, key, value, message):
    with pytest.raises(ConfigError) as err:
        _CLASSES[section](**{key: value})
    assert message in str(err.value)


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf and -inf are spelled the same in TOML
    return json.dumps(value)  # strings, numbers and lists are TOML too


@pytest.mark.parametrize("section, key, value, message", BAD_SETTINGS, ids=lambda v: repr(v)[:30])
def test_every_setting_is_checked_when_a_toml_file_is_loaded(tmp_path, section, key, value, message):
    path = tmp_path / "cfg.toml"
    path.write_text(f"[{section}]\n{key} = {_toml_value(value)}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: in `[{section}]`: ") and f"`{key}`" in text and message in text


@pytest.mark.parametrize("value, message", [
    ("true", "`seed` must be an integer from 0 to 4294967295; received `True` (bool)"),
    ("1.5", "`seed` must be an integer from 0 to 4294967295; received `1.5` (float)"),
    ("-1", "`seed` must be an integer from 0 to 4294967295; received `-1`"),
    ("4294967296", "`seed` must be an integer from 0 to 4294967295; received `4294967296`"),
    ('"7"', "`seed` must be an integer from 0 to 4294967295; received `'7'` (str)"),
])
def test_seed_is_a_32_bit_unsigned_integer(tmp_path, value, message):
    path = tmp_path / "cfg.toml"
    path.write_text(f"seed = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)
    assert RunConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ConfigError, match="`seed` must be an integer from 0 to 4294967295"):
        dataclasses.replace(RunConfig(), seed=-1)


def test_fractions_must_leave_images_for_training():
    with pytest.raises(ConfigError, match="`val_fraction` \\+ `test_fraction` must be below 1"):
        DataConfig(val_fraction=0.5, test_fraction=0.5)
    assert DataConfig(val_fraction=0.5, test_fraction=0.4).test_fraction == 0.4


def test_valid_edges_are_accepted():
    assert TrainConfig(epochs=10_000, batch_size=1, learning_rate=1, unfreeze_top=0).learning_rate == 1
    assert ModelConfig(image_size=1024).input_size == 1024 and ModelConfig(image_size=32).input_size == 32
    assert ModelConfig(backbone="mobilenet_v2", alpha=1).alpha == 1.0  # an integer alpha is a number
    assert ExportConfig(formats=["tflite-int8"], int8_budget=0, reference_images=1000).formats == ("tflite-int8",)


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "100000"], ("`image_size` (`--image-size`) for `mobilenet_v2` must be an integer from 32 "
                                  "to 1024; received `100000`")),
    (["--epochs", "0"], "`epochs` must be an integer from 1 to 10000; received `0`"),
    (["--seed", "-3"], "`seed` must be an integer from 0 to 4294967295; received `-3`"),
    (["--learning-rate", "0"], "`learning_rate` must be a number in (0.0, 1.0]; received `0.0`"),
])
def test_bad_settings_fail_in_the_cli_before_any_work(tmp_path, capsys, flags, message):
    from featx_edge.cli import main

    data = tmp_path / "missing-data"  # never looked at: the settings fail first
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "mobilenet_v2",
               "--weights", "none", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert "does not exist" not in err and not (tmp_path / "run").exists()


def test_bad_toml_values_fail_in_the_cli(tmp_path, capsys):
    from featx_edge.cli import main

    path = tmp_path / "cfg.toml"
    path.write_text("[train]\nepochs = true\n")
    rc = main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path}: in `[train]`: `epochs` must be an integer from 1 to 10000; "
                                      "received `True` (bool)")


def test_configs_round_trip_through_the_manifest_json():
    """A run re-reads its config from manifest.json: every checked setting survives JSON."""
    import json
    from pathlib import Path

    from featx_edge.config import config_from_dict

    examples = Path(__file__).parents[1] / "examples"
    for cfg in (RunConfig(), load_config(examples / "sample_digits.toml"), load_config(examples / "digits_pretrained.toml")):
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
