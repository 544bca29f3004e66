"""Export format names, shared by the CLI, the run directory and every JSON report."""

from __future__ import annotations

from featx_edge.errors import ConfigError

FORMATS: tuple[str, ...] = (
    "tflite-float32",
    "tflite-float16",
    "tflite-dynamic",
    "tflite-int8",
    "onnx-float32",
    "onnx-int8",
)
"""The standard export formats (`--formats all`), in the order they are produced and reported."""

INT8_VARIANTS: tuple[str, ...] = ("tflite-int8-selective", "tflite-int8-qat")
"""Extra int8 variants: made on request, or by `--int8-budget` when plain int8 misses it."""

ALL_FORMATS = FORMATS + INT8_VARIANTS

EXTENSIONS = {"tflite": ".tflite", "onnx": ".onnx"}


def artifact_filename(fmt: str) -> str:
    """File name of a format's artifact inside ``RUN/export/``, e.g. ``model.tflite-int8.tflite``."""
    check_format(fmt)
    return f"model.{fmt}{EXTENSIONS[fmt.split('-')[0]]}"


def check_format(fmt: str) -> str:
    """Return ``fmt`` if it is a known format name, else raise ConfigError naming the choices."""
    if fmt not in ALL_FORMATS:
        raise ConfigError(
            f"unknown export format `{fmt}`; allowed: {', '.join(ALL_FORMATS)}. "
            "Pass a comma-separated list, e.g. `--formats tflite-int8,onnx-float32`."
        )
    return fmt


def parse_formats(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"all"``, a comma-separated string or a list into a de-duplicated tuple of formats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ConfigError(f"`--formats` is empty; allowed: all, or any of {', '.join(ALL_FORMATS)}.")
    if items == ["all"]:
        return FORMATS
    seen: list[str] = []
    for item in items:
        if check_format(item) not in seen:
            seen.append(item)
    return tuple(seen)
