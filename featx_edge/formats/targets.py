"""Deployment targets for int8: which ONNX int8 recipe suits which CPU. A leaf module.

onnxruntime's int8 kernels differ by CPU. On x86-64 the fast path multiplies uint8 activations
by int8 weights (U8S8). Without VNNI that path (``VPMADDUBSW``) adds pairs of products into
16-bit lanes that can saturate, so onnxruntime's guidance is ``reduce_range`` (7-bit weights)
there; with VNNI (``VPDPBUSD``, 32-bit accumulation) full 8-bit weights are safe. ARM's int8
dot-product kernels prefer int8 activations (S8S8). ``portable`` is S8S8 with full 8-bit
weights: correct everywhere (no saturation on any CPU), the fastest only on ARM.

Example:
    >>> from featx_edge.formats.targets import resolve_target
    >>> resolve_target("arm64").activations
    'int8'
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from featx_edge.errors import ConfigError


@dataclass(frozen=True)
class Target:
    """One int8 target: the ONNX activation type and whether weights use a reduced range."""

    name: str
    activations: str  # "uint8" (U8S8) or "int8" (S8S8); weights are always int8, per channel
    reduce_range: bool
    why: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("portable", "int8", False,
           "S8S8: no 16-bit saturation on any CPU (but x86-64 and ARM kernels round differently: `featx-edge device-check` measured up to 0.06 in a probability); fastest on ARM, slow on x86-64"),
    Target("x86-64", "uint8", True,
           "x86-64 without VNNI: U8S8, with reduce_range (7-bit weights) so the 16-bit pair sums "
           "of VPMADDUBSW cannot saturate"),
    Target("x86-64-vnni", "uint8", False,
           "x86-64 with VNNI (VPDPBUSD accumulates in 32 bits): U8S8 with full 8-bit weights"),
    Target("arm64", "int8", False, "64-bit ARM: S8S8, what its int8 dot-product kernels prefer"),
)}
TARGET_CHOICES: tuple[str, ...] = ("auto", *TARGETS)
"""`--target` values: ``auto`` is this host, detected from its CPU."""


def detect_host(*, machine: str | None = None, cpuinfo: str | None = None) -> str:
    """This host's target name, from the architecture and (on x86-64) the CPU flags."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    if machine in ("x86_64", "amd64"):
        if cpuinfo is None:
            try:
                cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            except OSError:
                cpuinfo = ""
        flags = set()
        for line in cpuinfo.splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[-1].split())
                break
        return "x86-64-vnni" if flags & {"avx512_vnni", "avx_vnni"} else "x86-64"
    return "portable"


def resolve_target(name: str) -> Target:
    """The Target for a `--target` value (``auto``: this host)."""
    if name == "auto":
        return TARGETS[detect_host()]
    if name not in TARGETS:
        raise ConfigError(f"`--target` must be one of {', '.join(TARGET_CHOICES)}; received `{name}`.")
    return TARGETS[name]
