"""A wheel of the featx-edge that is running, for a device bundle.

- Running from a checkout (``pyproject.toml`` beside the package, e.g. an editable install or
  the test suite): ``pip wheel`` of a clean copy of it.
- Running from an installed wheel (``pip install .`` from a checkout, the README's install):
  the installed files, exactly as they are, packed back into a wheel from the distribution's own
  ``RECORD``: the device gets the code that exported and verified the model here.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import featx_edge
from featx_edge.errors import ConfigError, ExportError
from featx_edge.progress import native_output

log = logging.getLogger(__name__)

DISTRIBUTION = "featx-edge"
_INSTALL_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # written by pip, not part of a wheel


def own_wheel(out_dir: Path) -> tuple[Path, str]:
    """Write ``featx_edge-VERSION-py3-none-any.whl`` of the running featx-edge into ``out_dir``;
    (its path, what it was made from: ``this checkout`` or ``the installed featx-edge``).

    Raises:
        ConfigError: neither a checkout nor a complete installed copy to make it from.
        ExportError: ``pip wheel`` failed.
    """
    root = Path(featx_edge.__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text("utf-8") if (root / "pyproject.toml").is_file() else ""
    if re.search(r'^name\s*=\s*"featx-edge"', text, re.MULTILINE):
        return _build_from_checkout(root, text, out_dir), "this checkout"
    return repack_installed(out_dir), "the installed featx-edge"


def _build_from_checkout(root: Path, pyproject: str, out_dir: Path) -> Path:
    """``pip wheel`` of a clean copy of the checkout (so no build/ or egg-info is left in the tree)."""
    with tempfile.TemporaryDirectory(prefix="featx-edge-wheel-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root / "featx_edge", src / "featx_edge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for extra in [n for n in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in") if (root / n).is_file()]:
            shutil.copyfile(root / extra, src / extra)
        need = re.search(r'"setuptools>=(\d+)', pyproject)  # the build backend pyproject.toml asks for
        try:  # installed here and recent enough: build without isolation (offline); else pip fetches it
            offline = bool(need) and int(importlib.metadata.version("setuptools").split(".")[0]) >= int(need[1])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            offline = False
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] if offline else []),
               "-w", str(out_dir), str(src)]
        log.info("building the featx-edge wheel from %s ...", root)
        with native_output("pip wheel (building featx-edge)"):
            done = subprocess.run(cmd, check=False, timeout=600)
            if done.returncode != 0:
                raise ExportError(f"`{' '.join(cmd)}` failed (exit {done.returncode}; its output is above). Pass "
                                  "`--wheel PATH` to use a featx-edge wheel built elsewhere.")
    if len(wheels := sorted(out_dir.glob("featx_edge-*.whl"))) != 1:
        raise ExportError(f"pip wheel wrote {len(wheels)} featx-edge wheels in `{out_dir}`; expected one.")
    return wheels[0]


def repack_installed(out_dir: Path, *, distribution: str = DISTRIBUTION) -> Path:
    """Pack the installed featx-edge (its files as listed in its ``RECORD``) back into a wheel.

    The new ``RECORD`` holds each file's sha256 and size, as pip checks on install. Compiled
    ``__pycache__`` files and pip's own install markers are left out.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ConfigError(f"`{distribution}` is not installed here, so there is no wheel to make; pass "
                          "`--wheel PATH` (from `pip wheel --no-deps CHECKOUT`).") from err
    files = [f for f in dist.files or () if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if info is None or not any(f.as_posix() == "featx_edge/__init__.py" for f in files):
        raise ConfigError(f"the installed `{distribution}` lists no package files (an editable install?), so it "
                          "cannot be packed into a wheel; run featx-edge from its checkout or pass `--wheel PATH`.")
    name = f"featx_edge-{dist.version}-py3-none-any.whl"
    record, path = [], out_dir / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            if (f.parts[0] == info and f.name in _INSTALL_ONLY) or f.parts[0].startswith(".."):
                continue  # pip's markers, and scripts it wrote outside site-packages (bin/featx-edge)
            data = Path(dist.locate_file(f)).read_bytes()
            zf.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    log.info("packed the installed featx-edge %s into %s", dist.version, name)
    return path
