"""Installed versions of Python distributions (for reports, pins and the emulated device's wheels)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """``name -> version`` of those of ``names`` that are installed, in the order given."""
    return {name: version for name in names if (version := package_version(name)) is not None}
