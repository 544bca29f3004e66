"""Architectures and named CPU cores the device check can emulate, and the guest's /proc/cpuinfo.

QEMU 7.2 user mode shows the guest the host's x86 ``/proc/cpuinfo``; the CPU detection of
onnxruntime and XNNPACK (pytorch/cpuinfo) reads it and crashes. With ``-L PREFIX`` QEMU looks up
absolute paths under PREFIX first, so ``PREFIX/proc/cpuinfo`` written here is what the guest
reads. It must describe the emulated core: a newer core's part number makes the libraries pick
kernels the emulated core lacks (SIGILL). The MIDR fields below are QEMU's for each model
(target/arm/cpu64.c), the feature words those Linux shows for the core's ID registers.

``max`` is refused: it advertises every extension QEMU implements (SVE, SME...), which matches
no real core, and XNNPACK's int8 kernels gave wrong results on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from featx_edge.errors import ConfigError, FeatxError


class DeviceError(FeatxError):
    """The emulated target cannot be prepared or run (QEMU, apt-get, pip, the guest Python)."""


@dataclass(frozen=True)
class Core:
    """One named core as QEMU models it: its MIDR fields and the hwcaps Linux lists for it."""

    name: str
    implementer: int
    variant: int
    part: int
    revision: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class Arch:
    """A target architecture: how Debian, PyPI and QEMU name it, and the cores it offers."""

    name: str
    debian: str  # dpkg architecture of the sysroot packages
    qemu: str  # the user-mode emulator binary
    wheel_machine: str  # the machine part of manylinux wheel tags
    triplet: str
    cores: dict[str, Core]


_V8 = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid")
_V82 = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
        "asimdrdm", "lrcpc", "dcpop", "asimddp")

ARM64 = Arch(
    name="arm64", debian="arm64", qemu="qemu-aarch64-static", wheel_machine="aarch64", triplet="aarch64-linux-gnu",
    cores={core.name: core for core in (
        Core("cortex-a35", implementer=0x41, variant=0x1, part=0xD04, revision=0, features=_V8),
        Core("cortex-a53", implementer=0x41, variant=0x0, part=0xD03, revision=4, features=_V8),
        Core("cortex-a57", implementer=0x41, variant=0x1, part=0xD07, revision=0, features=_V8),
        Core("cortex-a72", implementer=0x41, variant=0x0, part=0xD08, revision=3, features=_V8),
        Core("cortex-a76", implementer=0x41, variant=0x4, part=0xD0B, revision=1, features=_V82),
        Core("neoverse-n1", implementer=0x41, variant=0x4, part=0xD0C, revision=1, features=(*_V82, "ssbs")),
    )},
)

ARCHES: dict[str, Arch] = {"arm64": ARM64}
ARCH_ALIASES = {"aarch64": "arm64"}
DEFAULT_CORES = ("cortex-a53", "cortex-a72", "cortex-a76")

_REFUSED = {
    "max": "QEMU's `max` core advertises every extension QEMU implements (SVE, SME, ...), matches no real "
           "core, and XNNPACK's int8 kernels gave wrong results on it",
    "host": "`host` needs KVM; user-mode emulation has no host core to pass through",
    "a64fx": "a64fx (512-bit SVE) is not checked here: its cpuinfo and kernels were never validated under QEMU",
}


def parse_arch(name: str) -> Arch:
    """The architecture called ``name`` (``arm64``, or its alias ``aarch64``); ConfigError otherwise."""
    key = ARCH_ALIASES.get(name, name)
    if key not in ARCHES:
        raise ConfigError(f"`--arch` must be one of {', '.join(ARCHES)}; received `{name}`. "
                          "Only 64-bit ARM targets can be emulated for now.")
    return ARCHES[key]


def parse_cores(arch: Arch, value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Named cores from ``--cpu`` (comma-separated); every unknown, refused or repeated name is reported.

    Example:
        >>> parse_cores(ARM64, "cortex-a53,cortex-a72")
        ('cortex-a53', 'cortex-a72')
    """
    if value is None:
        return DEFAULT_CORES
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    supported = ", ".join(arch.cores)
    if not names or any(not n for n in names):
        raise ConfigError(f"`--cpu` must list named cores separated by commas, e.g. `cortex-a53,cortex-a72`; "
                          f"received `{value}`. Supported on {arch.name}: {supported}.")
    problems = []
    for name in names:
        if name in _REFUSED:
            problems.append(f"`{name}` is refused: {_REFUSED[name]}")
        elif name not in arch.cores:
            problems.append(f"`{name}` is not a supported {arch.name} core")
    if problems:
        raise ConfigError(f"`--cpu`: {'; '.join(problems)}. Use named cores; supported on {arch.name}: "
                          f"{supported}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"`--cpu` lists {', '.join(repeated)} more than once; name each core once.")
    return tuple(names)


def cpuinfo_text(core: Core, *, processors: int) -> str:
    """An arm64 Linux ``/proc/cpuinfo`` for ``processors`` identical ``core``s.

    Example:
        >>> "CPU part\\t: 0xd08" in cpuinfo_text(ARM64.cores["cortex-a72"], processors=2)
        True
    """
    if isinstance(processors, bool) or not isinstance(processors, int) or processors < 1:
        raise ConfigError(f"`processors` must be an integer >= 1; received `{processors!r}`.")
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(core.features)}\n"
             f"CPU implementer\t: 0x{core.implementer:02x}\nCPU architecture: 8\n"
             f"CPU variant\t: 0x{core.variant:x}\nCPU part\t: 0x{core.part:03x}\nCPU revision\t: {core.revision}\n")
    return "".join(f"processor\t: {i}\n{block}\n" for i in range(processors))
