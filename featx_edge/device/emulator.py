"""Run the guest Python under QEMU user mode on one named core.

Each run gets its own prefix folder for ``qemu -L``: symlinks to the cached sysroot's top-level
folders plus a ``proc/cpuinfo`` for the emulated core (see ``cores``), so the cache itself is
never written to and cores can run side by side. The guest gets a clean environment: nothing of
the host's Python (PYTHONHOME, a virtualenv) leaks into it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

from featx_edge.device.cores import Arch, Core, DeviceError, cpuinfo_text

log = logging.getLogger(__name__)

PERTURB_ENV = "FEATX_EDGE_DEVICE_PERTURB"
"""Test hook, passed through to the guest: ``FORMAT=DELTA`` adds DELTA to that format's first class
probability inside the guest, to prove that the host's comparison catches a wrong result."""

INSTALL_HINT = {"qemu-aarch64-static": "apt-get install qemu-user-static"}


def find_qemu(arch: Arch) -> str:
    """The user-mode emulator for ``arch``; DeviceError naming the package to install otherwise."""
    path = shutil.which(arch.qemu)
    if path is None:
        hint = INSTALL_HINT.get(arch.qemu, f"install {arch.qemu}")
        raise DeviceError(f"`{arch.qemu}` was not found on PATH: the {arch.name} check runs the exported models "
                          f"under QEMU user-mode emulation. Install it with `{hint}` (Debian/Ubuntu; as root or "
                          "with sudo), then run the command again.")
    return path


def qemu_version(qemu: str) -> str:
    """QEMU's version line, e.g. ``qemu-aarch64 version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise DeviceError(f"`{qemu} --version` failed ({err}); reinstall it (`apt-get install --reinstall "
                          "qemu-user-static`).") from err
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def make_prefix(sysroot: Path, core: Core, where: Path, *, processors: int | None = None) -> Path:
    """A ``qemu -L`` prefix at ``where``: the sysroot's folders (symlinked) and ``proc/cpuinfo`` for ``core``."""
    where.mkdir(parents=True)
    for entry in sysroot.iterdir():
        if entry.name != "proc":
            (where / entry.name).symlink_to(entry.resolve())
    (where / "proc").mkdir()
    # As many processors as the host has: the CPU detection also reads the host's /sys/devices/system/cpu.
    count = processors or os.cpu_count() or 1
    (where / "proc" / "cpuinfo").write_text(cpuinfo_text(core, processors=count), encoding="utf-8")
    return where


def guest_environment(pythonpath: list[Path]) -> dict[str, str]:
    """The guest's environment: its own import path, nothing of the host's Python."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
           "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath),
           "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUTF8": "1",
           "OMP_NUM_THREADS": "1"}
    if os.environ.get(PERTURB_ENV):
        log.warning("%s is set: the guest perturbs its outputs on purpose (a test hook); expect failures",
                    PERTURB_ENV)
        env[PERTURB_ENV] = os.environ[PERTURB_ENV]
    return env


def run_python(*, qemu: str, core: str, prefix: Path, python: Path, pythonpath: list[Path], args: list[str],
               timeout: float) -> subprocess.CompletedProcess:
    """``python ARGS`` inside the emulated ``core``; output captured (the caller shows it on failure)."""
    cmd = [qemu, "-cpu", core, "-L", str(prefix), str(python), *args]
    log.debug("guest: %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=guest_environment(pythonpath), cwd=prefix, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise DeviceError(f"the emulated {core} did not finish within {timeout:.0f} s; emulation is slow on a busy "
                          "host: check fewer images (`--images N`) or fewer cores (`--cpu`)") from err
    except OSError as err:
        raise DeviceError(f"cannot start `{qemu}` ({err.strerror or err}); reinstall qemu-user-static") from err


def describe_exit(proc: subprocess.CompletedProcess) -> str:
    """``exit 1`` or ``killed by SIGILL (illegal instruction: ...)`` for a finished guest."""
    if proc.returncode >= 0:
        return f"exit {proc.returncode}"
    try:
        name = signal.Signals(-proc.returncode).name
    except ValueError:
        name = f"signal {-proc.returncode}"
    why = {"SIGILL": " (an instruction the emulated core lacks: the cpuinfo and the core disagree)",
           "SIGSEGV": " (a crash; the CPU detection fails this way on a foreign /proc/cpuinfo)"}.get(name, "")
    return f"killed by {name}{why}"


def output_tail(proc: subprocess.CompletedProcess, *, lines: int = 25) -> str:
    text = "\n".join(part.strip() for part in (proc.stdout, proc.stderr) if part and part.strip())
    return "\n".join(text.splitlines()[-lines:])
