import dataclasses

import pytest

from featx_edge.config import DataConfig, ExportConfig, ModelConfig, RunConfig, TrainConfig, load_config
from featx_edge.errors import ConfigError
from featx_edge.formats import FORMATS, artifact_filename, parse_formats


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
    ({"image_size": 16}, "`--image-size` for `efficientnet_lite0` must be an integer >= 32"),
    ({"head_units": -1}, "`head_units` must be an integer >= 0"),
])
def test_model_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        ModelConfig(**kwargs)
    if "backbone" in kwargs and kwargs["backbone"] == "mobilenet2":
        assert "featx-edge backbones" in str(err.value)


def test_train_and_data_ranges():
    with pytest.raises(ConfigError, match="`epochs` must be an integer >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="`test_fraction` must be in"):
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
