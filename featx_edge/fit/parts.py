"""What ``fit`` needs of a microcontroller: its RAM and flash (a profile), TFLM's arena for a model, Vela's time.

Stand-ins, each behind one function, until ``featx_edge.mcu`` (issue 23's ``featx-edge mcu``) is on
main: at that merge ``get_profile`` and ``verdict`` point at ``featx_edge.mcu.profiles``
(``get_profile``, ``fit``), ``tflm_arena`` at ``featx_edge.mcu.tflm.run_tflm`` (no images: the
arena alone) and ``vela_ms`` at ``featx_edge.mcu.vela.compile_for``. The profiles here carry the
same names, figures and reserves as that table, so a fit found here fits there.

The arena is TensorFlow Lite Micro's own figure (its recording allocator, run in a child process
because TFLM's C++ prints the report to the process's stderr), never an estimate.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from featx_edge.errors import ConfigError, ExportError

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Profile:
    """A part: RAM and flash, and what a TFLM application needs of each beside the model (stated reserves)."""

    name: str
    part: str
    ram_bytes: int
    flash_bytes: int
    runtime_reserve_bytes: int
    code_reserve_bytes: int
    npu: str | None = None


_PROFILES = {p.name: p for p in (
    Profile("cortex-m4-256k", part="Nordic nRF52840", ram_bytes=256 * KIB, flash_bytes=1 * MIB,
            runtime_reserve_bytes=32 * KIB, code_reserve_bytes=128 * KIB),
    Profile("cortex-m7-1m", part="STMicroelectronics STM32H743ZI", ram_bytes=1 * MIB, flash_bytes=2 * MIB,
            runtime_reserve_bytes=64 * KIB, code_reserve_bytes=128 * KIB),
    Profile("cortex-m55-ethos-u55", part="Alif Semiconductor Ensemble E7", ram_bytes=4 * MIB,
            flash_bytes=int(5.5 * MIB), runtime_reserve_bytes=64 * KIB, code_reserve_bytes=256 * KIB,
            npu="ethos-u55-256"),
)}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ConfigError naming the choices otherwise."""
    if name not in _PROFILES:
        raise ConfigError(f"unknown microcontroller profile `{name}`; allowed: {', '.join(_PROFILES)}.")
    return _PROFILES[name]


def verdict(profile: Profile, *, arena_bytes: int, model_bytes: int) -> dict:
    """Whether the model fits: arena + runtime reserve within RAM, model + code reserve within flash; both margins."""
    ram_needed = arena_bytes + profile.runtime_reserve_bytes
    flash_needed = model_bytes + profile.code_reserve_bytes
    ram = {"available": profile.ram_bytes, "arena": arena_bytes, "reserve": profile.runtime_reserve_bytes,
           "needed": ram_needed, "margin": profile.ram_bytes - ram_needed}
    flash = {"available": profile.flash_bytes, "model": model_bytes, "reserve": profile.code_reserve_bytes,
             "needed": flash_needed, "margin": profile.flash_bytes - flash_needed}
    return {"profile": profile.name, "part": profile.part, "ram": ram, "flash": flash,
            "fits": ram["margin"] >= 0 and flash["margin"] >= 0}


_ARENA = re.compile(r"Arena allocation total (\d+) bytes")
_CHILD = """
import sys
import numpy as np
from tflite_micro import runtime
interpreter = runtime.Interpreter.from_file(sys.argv[1], arena_size=64 << 20)
details = interpreter.get_input_details(0)
interpreter.set_input(np.zeros(tuple(details["shape"]), details["dtype"]), 0)
interpreter.invoke()
sys.stderr.flush()
interpreter.print_allocations()
"""


def tflm_arena(model: Path, *, timeout: float = 600) -> int:
    """TFLM's recording-allocator arena for ``model`` (bytes), after one inference on a blank image.

    Raises:
        ExportError: TFLM could not run the model (the reason in one line).
    """
    try:
        import tflite_micro  # noqa: F401  (the child needs it; say so here, in one line)
    except ImportError as err:
        raise ConfigError("`featx-edge fit` needs TensorFlow Lite Micro for the arena: "
                          "pip install 'featx-edge[mcu]' (the tflite-micro package).") from err
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(model)], capture_output=True, timeout=timeout,
                          check=False)
    found = _ARENA.search(proc.stderr.decode("utf-8", "replace"))
    if proc.returncode != 0 or found is None:
        tail = [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        raise ExportError(f"TensorFlow Lite Micro could not run `{model}` (exit status {proc.returncode}): "
                          f"{tail[-1][:300] if tail else 'no output'}.")
    return int(found.group(1))


def vela_ms(model: Path, accelerator: str, *, timeout: float = 1800) -> float:
    """Vela's estimated time per inference on ``accelerator`` (ms, its performance model: an estimate)."""
    with tempfile.TemporaryDirectory(prefix="featx-edge-vela-") as tmp:
        command = [sys.executable, "-m", "ethosu.vela", "--accelerator-config", accelerator, "--output-dir", tmp,
                   str(Path(model).resolve())]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=tmp)
        summaries = sorted(Path(tmp).glob("*_summary_*.csv"))
        if proc.returncode != 0 or not summaries:
            tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            raise ExportError(f"Vela could not compile `{model}` for {accelerator}: {tail[-1][:300] if tail else ''}")
        with open(summaries[0], newline="", encoding="utf-8") as fh:
            return float(next(csv.DictReader(fh))["inference_time"]) * 1000.0
