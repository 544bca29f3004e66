"""The emulated target's Python: built once from the host's package managers, then cached.

Two cached layers under ``$FEATX_EDGE_HOME/device/ARCH/`` (or ``~/.cache/featx-edge``):

- ``base-KEY/``: ``sysroot/`` (Debian bookworm's arm64 Python 3.11 and the C libraries it needs,
  unpacked with ``dpkg-deb -x``; fetched by ``apt-get download`` with a private apt state
  restricted to the architecture, so the host's dpkg is untouched) and ``site/`` (PyPI's
  manylinux wheels of the runtime's dependencies, at the host's versions, installed with
  ``pip install --target``). KEY is a digest of the Debian package versions and wheel versions
  actually used, listed in ``env.json``; ``requests/`` maps what was asked (the package list
  and the pinned wheel versions) to it, so a later check needs no network.
- ``featx-VERSION-SHA/``: this featx-edge package, copied; SHA is a digest of its files.

Each layer is built in a temporary folder beside its final place and renamed into place when
complete; one builder at a time (an advisory lock), so a killed or concurrent build never
leaves a half-made environment that a check would use.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from featx_edge import __version__
from featx_edge.data.sample import featx_home
from featx_edge.device.cores import Arch, DeviceError
from featx_edge.device.emulator import describe_exit, make_prefix, output_tail, run_python
from featx_edge.files.atomic import write_json
from featx_edge.versions import installed_versions

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no QEMU user mode anyway
    fcntl = None

log = logging.getLogger(__name__)

LAYOUT = 1  # bump when the layout of a built environment changes
DEBIAN_SUITE = "bookworm"
GUEST_PYTHON = "3.11"  # bookworm's Python
DEBIAN_ARCHIVES = (("http://deb.debian.org/debian", (DEBIAN_SUITE, f"{DEBIAN_SUITE}-updates")),
                   ("http://deb.debian.org/debian-security", (f"{DEBIAN_SUITE}-security",)))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
                   "libstdc++6", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1",
                   "libcrypt1")
WHEELS = ("numpy", "pillow", "onnxruntime", "ai-edge-litert")  # the runtime's dependencies (pyproject)
GLIBC_MINOR = 36  # bookworm's glibc 2.36: every manylinux tag up to it fits
SMOKE_CORE = "cortex-a72"
TIMEOUT_S = 900


@dataclass(frozen=True)
class Environment:
    """A built guest environment: where its Python is and what it was made of (``info``)."""

    arch: Arch
    base: Path
    featx: Path
    info: dict

    @property
    def sysroot(self) -> Path:
        return self.base / "sysroot"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{GUEST_PYTHON}"

    @property
    def pythonpath(self) -> list[Path]:
        return [self.featx, self.base / "site"]


def cache_dir() -> Path:
    """``$FEATX_EDGE_HOME/device`` (``~/.cache/featx-edge/device`` by default)."""
    return featx_home() / "device"


def ensure_environment(arch: Arch, *, qemu: str) -> Environment:
    """The cached environment for ``arch``, built first if needed (needs Debian's archive and PyPI).

    Raises:
        DeviceError: a tool is missing, a download failed, or the built Python does not start; each
            message names the step and the fix.
    """
    home = cache_dir() / arch.name
    request = _request(arch)
    request_file = home / "requests" / f"{_digest(request)}.json"
    featx_name, featx_sha = _featx_identity()
    base = _cached_base(home, request_file)
    if base is None or not (home / featx_name).is_dir():
        with _build_lock(home):
            base = _cached_base(home, request_file)
            if base is None:
                base = _build_base(home, arch, request=request, qemu=qemu)
                write_json(request_file, {"base": base.name, "request": request})
            if not (home / featx_name).is_dir():
                _build_featx(home / featx_name, sha=featx_sha)
    info = json.loads((base / "env.json").read_text(encoding="utf-8"))
    info["featx_edge"] = {"version": __version__, "sha256": featx_sha, "layer": featx_name}
    return Environment(arch=arch, base=base, featx=home / featx_name, info=info)


def _request(arch: Arch) -> dict:
    """What a build asks for: the guest's packages and the host's versions of the runtime's wheels."""
    pins = installed_versions(WHEELS)  # one not installed here: the newest
    return {"layout": LAYOUT, "arch": arch.name, "suite": DEBIAN_SUITE, "python": GUEST_PYTHON,
            "debian": sorted(DEBIAN_PACKAGES), "wheels": pins}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _cached_base(home: Path, request_file: Path) -> Path | None:
    try:
        base = home / json.loads(request_file.read_text(encoding="utf-8"))["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = base.parent == home and (base / "env.json").is_file() and (base / "sysroot" / "usr" / "bin").is_dir()
    return base if ok else None


def _featx_identity() -> tuple[str, str]:
    """The featx-edge layer's folder name and the digest of the package's files."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    sha = digest.hexdigest()
    return f"featx-{__version__}-{sha[:16]}", sha


@contextlib.contextmanager
def _build_lock(home: Path) -> Iterator[None]:
    """One builder at a time; leftovers of builds that died (``.build-*``) are removed under the lock."""
    home.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(home / ".build.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another featx-edge process that builds the %s environment", home.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            for stale in home.glob(".build-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_base(home: Path, arch: Arch, *, request: dict, qemu: str) -> Path:
    log.info("building the emulated %s environment (once; cached in %s)", arch.name, home)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
    try:
        debian = _fetch_sysroot(arch, work=tmp / "apt", sysroot=tmp / "sysroot")
        wheels = _fetch_site(arch, pins=request["wheels"], work=tmp / "wheels", site=tmp / "site")
        shutil.rmtree(tmp / "apt")
        shutil.rmtree(tmp / "wheels")
        info = {key: request[key] for key in ("layout", "arch", "suite", "python")}
        info.update(debian=debian, wheels=wheels)
        write_json(tmp / "env.json", info)
        _smoke_test(arch, tmp, qemu=qemu)
        final = home / f"base-{_digest(info)}"
        if final.exists():  # the same versions were built under another request
            shutil.rmtree(tmp)
        else:
            _publish(tmp, final)
        log.info("emulated %s environment ready: %s", arch.name, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_featx(final: Path, *, sha: str) -> None:
    package = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix=".build-featx-", dir=final.parent))
    try:
        shutil.copytree(package, tmp / "featx_edge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Byte code of the host's Python: used by the guest when both are 3.11, ignored otherwise.
        compileall.compile_dir(tmp / "featx_edge", quiet=2)
        write_json(tmp / "env.json", {"version": __version__, "sha256": sha})
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete build into place (atomic), with the usual folder mode (mkdtemp makes 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    os.rename(tmp, final)


def _run(cmd: list[str], *, what: str, fix: str, cwd: Path | None = None, timeout: float = TIMEOUT_S) -> str:
    """Run a host tool quietly; DeviceError with its output's tail and ``fix`` if it fails."""
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace", cwd=cwd,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise DeviceError(f"{what} did not finish within {timeout:.0f} s. {fix}") from err
    except OSError as err:
        raise DeviceError(f"{what}: cannot run `{cmd[0]}` ({err.strerror or err}). {fix}") from err
    failed = proc.returncode != 0
    if not failed and cmd[0] == "apt-get" and "update" in cmd:  # apt-get update exits 0 when fetches fail
        failed = any(line.startswith(("W:", "E:")) and ("fetch" in line or "failed" in line)
                     for line in proc.stderr.splitlines())
    if failed:
        how = describe_exit(proc) if proc.returncode else "downloads failed"
        raise DeviceError(f"{what} failed ({how}):\n{output_tail(proc)}\n{fix}")
    return proc.stdout


def _fetch_sysroot(arch: Arch, *, work: Path, sysroot: Path) -> dict[str, str]:
    """Debian's packages for ``arch`` unpacked into ``sysroot``; their versions by name."""
    for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise DeviceError(f"`{tool}` was not found: building the {arch.name} sysroot needs a Debian-family "
                              f"host with apt ({package}); run the check on Debian or Ubuntu.")
    if not KEYRING.is_file():
        raise DeviceError(f"`{KEYRING}` is missing: it verifies Debian's packages. Install it with "
                          "`apt-get install debian-archive-keyring`.")
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d",
                "etc/apt.conf.d", "debs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "status").touch()
    (work / "etc/sources.list").write_text("".join(
        f"deb [arch={arch.debian} signed-by={KEYRING}] {url} {suite} main\n"
        for url, suites in DEBIAN_ARCHIVES for suite in suites), encoding="utf-8")
    apt = ["apt-get", "-q", "-o", f"Dir::State={work / 'state'}", "-o", f"Dir::State::status={work / 'status'}",
           "-o", f"Dir::Cache={work / 'cache'}", "-o", f"Dir::Etc::SourceList={work / 'etc/sources.list'}",
           "-o", f"Dir::Etc::SourceParts={work / 'etc/sources.list.d'}",
           "-o", f"Dir::Etc::Preferences={work / 'etc/preferences'}",
           "-o", f"Dir::Etc::PreferencesParts={work / 'etc/preferences.d'}",
           "-o", f"Dir::Etc::Parts={work / 'etc/apt.conf.d'}", "-o", f"APT::Architecture={arch.debian}",
           "-o", f"APT::Architectures={arch.debian}", "-o", "Acquire::Languages=none",
           # the private folders belong to this user; apt's `_apt` sandbox user could not write them
           "-o", "APT::Sandbox::User=root"]
    archives = ", ".join(url for url, _ in DEBIAN_ARCHIVES)
    network = (f"Check that this host reaches Debian's archive ({archives}); behind a proxy, set "
               "`http_proxy` / configure apt's Acquire::http::Proxy.")
    log.info("downloading Debian %s %s packages (Python %s and its libraries)", DEBIAN_SUITE, arch.debian,
             GUEST_PYTHON)
    _run([*apt, "update"], what=f"`apt-get update` for Debian {DEBIAN_SUITE} {arch.debian}", fix=network)
    _run([*apt, "download", *DEBIAN_PACKAGES], what=f"`apt-get download` of the {arch.debian} packages",
         fix=network, cwd=work / "debs")
    versions = {}
    for deb in sorted((work / "debs").glob("*.deb")):
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"], what=f"reading {deb.name}",
                      fix="the download is damaged; run the command again").splitlines()
        versions[fields[0].split(":", 1)[1].strip()] = fields[1].split(":", 1)[1].strip()
        _run(["dpkg-deb", "-x", str(deb), str(sysroot)], what=f"unpacking {deb.name}",
             fix="check the free space of the cache folder (set FEATX_EDGE_HOME to move it)")
    missing = sorted(set(DEBIAN_PACKAGES) - set(versions))
    if missing:
        raise DeviceError(f"`apt-get download` did not fetch {', '.join(missing)}; {network}")
    return dict(sorted(versions.items()))


def _platform_args(arch: Arch) -> list[str]:
    tags = [f"manylinux2014_{arch.wheel_machine}"] + [f"manylinux_2_{m}_{arch.wheel_machine}"
                                                       for m in range(17, GLIBC_MINOR + 1)]
    args = [arg for tag in tags for arg in ("--platform", tag)]
    return [*args, "--python-version", GUEST_PYTHON, "--implementation", "cp",
            "--abi", f"cp{GUEST_PYTHON.replace('.', '')}", "--abi", "abi3", "--abi", "none", "--only-binary=:all:"]


def _fetch_site(arch: Arch, *, pins: dict[str, str], work: Path, site: Path) -> dict[str, str]:
    """PyPI's wheels for the guest (with their dependencies) installed into ``site``; versions by name."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "--version"], what="pip", fix=f"install pip for {sys.executable} (`python -m ensurepip`)")
    wanted = [f"{name}=={pins[name]}" if name in pins else name for name in WHEELS]
    log.info("downloading %s wheels: %s", arch.wheel_machine, ", ".join(wanted))
    _run([*pip, "download", "--quiet", "--dest", str(work), *_platform_args(arch), *wanted],
         what=f"`pip download` of the {arch.wheel_machine} wheels ({', '.join(wanted)})",
         fix=f"Check that this host reaches PyPI (pip's index settings apply). The versions are the host's, so "
             f"the guest runs the same code; if PyPI has no manylinux {arch.wheel_machine} wheel for Python "
             f"{GUEST_PYTHON} of one of them, install a version here that has one.")
    wheels = sorted(work.glob("*.whl"))
    _run([*pip, "install", "--quiet", "--no-deps", "--no-index", "--target", str(site), *_platform_args(arch),
          *map(str, wheels)], what="`pip install --target` of the guest's wheels",
         fix="check the free space of the cache folder (set FEATX_EDGE_HOME to move it)")
    versions = {}
    for wheel in wheels:  # name-version-tags.whl, the name normalised with underscores
        name, version = wheel.name.split("-")[:2]
        versions[name.replace("_", "-").lower()] = version
    return dict(sorted(versions.items()))


def _smoke_test(arch: Arch, root: Path, *, qemu: str) -> None:
    """The new Python must start and import the engines under emulation before it is cached."""
    code = "import numpy, PIL.Image, onnxruntime, ai_edge_litert.interpreter; print('ok')"
    with tempfile.TemporaryDirectory(prefix="featx-edge-smoke-") as tmp:
        prefix = make_prefix(root / "sysroot", arch.cores[SMOKE_CORE], Path(tmp) / "prefix")
        proc = run_python(qemu=qemu, core=SMOKE_CORE, prefix=prefix,
                          python=root / "sysroot" / "usr" / "bin" / f"python{GUEST_PYTHON}",
                          pythonpath=[root / "site"], args=["-c", code], timeout=TIMEOUT_S)
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        raise DeviceError(f"the emulated {arch.name} Python does not start or cannot import the engines "
                          f"({describe_exit(proc)}):\n{output_tail(proc)}\nNothing was cached; report this with "
                          "the output above (the Debian or wheel versions may not fit together).")
