"""Typed errors. Every message says what was received, what is allowed and the fix."""

from __future__ import annotations


class FeatxError(Exception):
    """Base class for every error featx-edge raises on purpose (user-facing)."""


class ConfigError(FeatxError):
    """A setting is missing, unknown or out of range."""


class DataError(FeatxError):
    """The image folder cannot be used as given."""


class WeightsError(FeatxError):
    """Backbone weights could not be obtained or do not fit the backbone."""


class RunDirError(FeatxError):
    """A run directory is missing files or does not match its manifest."""


class CheckpointError(RunDirError):
    """The resume checkpoint of a training (``state.json`` or its weight files) is damaged or edited."""


class ExportError(FeatxError):
    """A model could not be exported, or the export is not what was asked for."""


class ModelFileError(FeatxError):
    """A model file is unreadable, truncated, of an unknown kind or lacks featx-edge metadata."""


class ImageError(FeatxError):
    """An input image could not be read."""


class VerificationError(FeatxError):
    """One or more exported models do not match the reference model."""


class NonFiniteOutputError(VerificationError):
    """A model gave NaN or Inf outputs: it is broken (for example a NaN weight); never a result."""


class FitError(FeatxError):
    """``featx-edge fit`` found no model that fits the part (the figures say by how much)."""


def received(value: object, *, wrong_type: bool) -> str:
    """How an error shows the value it received; with its type when the type is the problem."""
    return f"`{value!r}` ({type(value).__name__})" if wrong_type else f"`{value}`"


def is_int(value: object) -> bool:
    """An int, not a bool (``True`` is an int to Python, never a count to a setting) nor a float such as 10.0."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, *, low: int, high: int | None = None, why_high: str | None = None) -> int:
    """The one integer check of settings and flags: ``value`` if an integer in [low, high], else ConfigError.

    ``why_high`` says where the upper bound comes from (e.g. the machine's CPUs); the error then
    reads ">= low and at most high (why_high)".

    Example:
        >>> check_int("--threads", 0, low=1)
        Traceback (most recent call last):
        featx_edge.errors.ConfigError: `--threads` must be an integer >= 1; received `0`.
    """
    integer = is_int(value)
    if not integer or value < low or (high is not None and value > high):
        if high is None:
            allowed = f">= {low}"
        elif why_high:
            allowed = f">= {low} and at most {high} ({why_high})"
        else:
            allowed = f"from {low} to {high}"
        raise ConfigError(f"`{name}` must be an integer {allowed}; received {received(value, wrong_type=not integer)}.")
    return value


def name_list(name: str, value: object, *, what: str) -> list[str]:
    """A comma-separated string or a list of strings as its non-empty, stripped items (order kept);
    ConfigError naming ``name`` and ``what`` the items are when it is neither."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"`{name}` must be a list of {what}; received `{value!r}`.")
    return [item.strip() for item in items if item.strip()]
