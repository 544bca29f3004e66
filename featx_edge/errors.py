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
