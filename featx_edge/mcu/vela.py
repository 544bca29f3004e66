"""Compile an integer ``.tflite`` for an Arm Ethos-U NPU with Vela (``ethos-u-vela``) and read its summary.

Vela runs in a child process in a scratch folder; what it prints (its warnings about the
configuration defaults it chose, operators it leaves to the CPU) is kept and recorded, never
shown. Its figures come from the summary CSV (SRAM and flash use, the clock and system
configuration it assumed, its estimated time per inference) and from its summary text (operators
on the NPU and on the CPU). The inference time is Vela's performance model: an estimate, labelled
so wherever it appears.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from featx_edge.errors import ConfigError, ExportError, name_list
from featx_edge.files.atomic import write_bytes

ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
                "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
"""Vela 5.2's ``--accelerator-config`` choices."""
ESTIMATE_NOTE = ("Vela's performance model at the clock and system configuration named (its defaults): an estimate "
                 "before any hardware, not a measurement")
_COUNT = re.compile(r"^(CPU|NPU) operators = (\d+)", re.MULTILINE)
_CPU_LINE = re.compile(r"^\s*CPU: (\S+) = (.+?)(?: \(outputs .*\))?$", re.MULTILINE)
_REASON = re.compile(r"^Warning \(supported operators\) operator: (\S+), ofm: '([^']*)'\s*\n\s*Reason: (.+)$",
                     re.MULTILINE)


def require_vela() -> None:
    """ImportError (named ``ethosu``) when the ``[mcu]`` extra is not installed; the CLI names the extra."""
    import ethosu.vela  # noqa: F401


def parse_npu(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``--npu`` (comma-separated accelerator configurations) as known names, each once."""
    if value is None:
        return ()
    names = name_list("npu", value, what="Ethos-U configurations")
    unknown = [name for name in names if name not in ACCELERATORS]
    if unknown:
        raise ConfigError(f"unknown Ethos-U configuration `{unknown[0]}` in `--npu`; allowed: "
                          f"{', '.join(ACCELERATORS)} (e.g. `--npu ethos-u55-128`).")
    return tuple(dict.fromkeys(names))


def compile_for(model: Path, accelerator: str, *, out: Path, timeout: float = 1800) -> dict:
    """Compile ``model`` for ``accelerator``; the optimised file is written to ``out``.

    Returns the ``mcu.json`` entry: npu_op_share, cpu_ops, sram_bytes, flash_bytes, inference_ms,
    clock_hz, system_config, with what Vela printed under ``vela_output``.

    Raises:
        ExportError: Vela failed, naming its last line.
    """
    with tempfile.TemporaryDirectory(prefix="featx-edge-vela-") as tmp:
        command = [sys.executable, "-m", "ethosu.vela", "--accelerator-config", accelerator, "--show-cpu-operations",
                   "--output-dir", tmp, str(Path(model).resolve())]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=tmp)
        except subprocess.TimeoutExpired as err:
            raise ExportError(f"Vela did not compile `{model}` for {accelerator} in {timeout:.0f} s.") from err
        printed = (proc.stdout + proc.stderr).strip()
        summaries = sorted(Path(tmp).glob("*_summary_*.csv"))
        optimised = sorted(Path(tmp).glob("*_vela.tflite"))
        if proc.returncode != 0 or not summaries or not optimised:
            tail = [line for line in printed.splitlines() if line.strip()]
            raise ExportError(f"Vela could not compile `{model}` for {accelerator} (exit status {proc.returncode}): "
                              f"{tail[-1][:300] if tail else 'no output'}.")
        with open(summaries[0], newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        entry = summary_entry(row, printed, ops=ops_by_output(Path(model).read_bytes()))
        write_bytes(out, optimised[0].read_bytes())
    return entry


def ops_by_output(flatbuffer: bytes) -> dict[str, str]:
    """Each operator's type by the name of its first output tensor (Vela names CPU operators by tensor)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # as export.tflite.op_types reads it
        codes.append(names.get(value, f"BUILTIN_{value}") if value != schema.BuiltinOperator.CUSTOM
                     else f"CUSTOM:{(code.CustomCode() or b'').decode()}")
    out = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            if op.OutputsLength():
                tensor = graph.Tensors(op.Outputs(0))
                out[(tensor.Name() or b"").decode("utf-8", "replace")] = codes[op.OpcodeIndex()]
    return out


def summary_entry(row: dict, printed: str, *, ops: dict[str, str]) -> dict:
    """The ``mcu.json`` fields from Vela's summary CSV row, its printed summary and the model's
    operator types by output tensor (``ops_by_output``)."""
    counts = {kind: int(n) for kind, n in _COUNT.findall(printed)}
    npu, cpu = counts.get("NPU", 0), counts.get("CPU", 0)
    reasons = {name: (op, reason.strip()) for op, name, reason in _REASON.findall(printed)}
    cpu_ops = []
    for op, name in _CPU_LINE.findall(printed):
        reason = reasons.get(name, ("", ""))[1]
        cpu_ops.append({"op": ops.get(name, op), "tensor": name,
                        "reason": reason or "Vela leaves it to the CPU"})
    seconds = _number(row.get("inference_time"))
    warnings = [line.strip() for line in printed.splitlines() if line.startswith("Warning")]
    return {"npu_op_share": npu / (npu + cpu) if npu + cpu else 0.0, "npu_ops": npu, "cpu_ops": cpu_ops,
            "sram_bytes": round(_number(row.get("sram_memory_used")) * 1024),
            "flash_bytes": round((_number(row.get("off_chip_flash_memory_used"))
                                  + _number(row.get("on_chip_flash_memory_used"))) * 1024),
            "inference_ms": seconds * 1000.0, "inference_ms_is": "estimate", "estimate_note": ESTIMATE_NOTE,
            "clock_hz": int(_number(row.get("core_clock"))), "system_config": row.get("system_config"),
            "memory_mode": row.get("memory_mode"), "accelerator": row.get("accelerator_configuration"),
            "vela_warnings": warnings, "vela_output": printed}


def _number(text: str | None) -> float:
    try:
        value = float(text or 0.0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0  # Vela writes nan when nothing ran on the NPU
