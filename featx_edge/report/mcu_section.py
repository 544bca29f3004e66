"""The report's microcontroller section, from ``RUN/mcu.json`` (``featx-edge mcu``); no model is run here.

An entry measured on an earlier export, against an earlier reference, or whose firmware sources or
Vela file changed on disk since is shown as stale, never as a pass.
"""

from __future__ import annotations

from pathlib import Path

from featx_edge.files.atomic import inside, sha256_file
from featx_edge.mcu import MCU_JSON
from featx_edge.report.page import Html, note, section, table

_HEADERS = ["format", "TFLM top-1 agreement [95% CI]", "accuracy", "change, points", "arena", "flash",
            "unsupported ops", "notes", "result"]


def _kib(n) -> str:
    return "—" if not isinstance(n, (int, float)) else f"{n / 1024:,.1f} KiB"


def _f(value, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return "—"


def _changed_files(run: Path, entry: dict) -> list[str]:
    """Files ``mcu.json`` recorded for this format that are missing or differ on disk now."""
    recorded = []
    firmware = entry.get("firmware") if isinstance(entry.get("firmware"), dict) else {}
    for name, sha in (firmware.get("files") or {}).items():
        recorded.append((f"{firmware.get('folder')}/{name}", sha))
    for npu in (entry.get("npu") or {}).values():
        if isinstance(npu, dict) and npu.get("path"):
            recorded.append((npu["path"], npu.get("sha256")))
    changed = []
    for rel, sha in recorded:
        path = run / rel
        if not inside(rel) or not path.is_file() or sha256_file(path) != sha:
            changed.append(rel)
    return changed


def status(src, fmt: str, entry: dict) -> tuple[str, str]:
    """(``pass`` | ``FAIL`` | ``stale``, why) for one format of mcu.json, against the current files."""
    if src.mcu.get("reference_sha256") != (src.manifest.get("reference") or {}).get("sha256"):
        return "stale", "judged against an earlier reference model"
    stale = src.stale_reason(fmt, entry.get("sha256"))
    if stale:
        return "stale", stale
    changed = _changed_files(src.run.path, entry)
    if changed:
        return "stale", "changed since `featx-edge mcu` wrote them: " + ", ".join(changed)
    failures = "; ".join(map(str, entry.get("failures") or []))
    return ("pass", "") if entry.get("passed") else ("FAIL", failures)


def _rows(src, fmt: str, entry: dict) -> tuple[list[list[object]], list[str | None]]:
    tflm = entry.get("tflm") if isinstance(entry.get("tflm"), dict) else {}
    verdict, why = status(src, fmt, entry)
    ci = tflm.get("judged_top1_agreement_ci95") or tflm.get("top1_agreement_ci95")
    agreement = _f(tflm.get("judged_top1_agreement", tflm.get("top1_agreement")), ".4f") + (
        f" [{_f(ci[0], '.3f')}, {_f(ci[1], '.3f')}]" if isinstance(ci, list) and len(ci) == 2 else "")
    rows = [[fmt, agreement, _f(tflm.get("accuracy"), ".4f"),
             _f(tflm.get("judged_accuracy_change_points", tflm.get("accuracy_change_points")), "+.2f"),
             _kib(tflm.get("arena_bytes")), _kib(tflm.get("flash_bytes")),
             ", ".join(tflm.get("unsupported_ops") or []) or "none", why, verdict]]
    classes: list[str | None] = [verdict.lower()]
    for accelerator, npu in (entry.get("npu") or {}).items():
        if not isinstance(npu, dict) or "error" in npu:
            rows.append([f"↳ {accelerator}", "", "", "", "", "", "", str((npu or {}).get("error")), "FAIL"])
            classes.append("fail")
            continue
        cpu = ", ".join(sorted({str(op.get("op")) for op in npu.get("cpu_ops") or []})) or "none"
        estimate = (f"estimated {_f(npu.get('inference_ms'), '.2f')} ms at "
                    f"{_f((npu.get('clock_hz') or 0) / 1e6, '.0f')} MHz, {npu.get('system_config')} "
                    "(Vela's estimate, not a measurement)")
        rows.append([f"↳ {accelerator} (Vela)", f"{_f(npu.get('npu_op_share'), '.0%')} of operators on the NPU", "",
                     "", f"SRAM {_kib(npu.get('sram_bytes'))}", _kib(npu.get("flash_bytes")), f"CPU: {cpu}",
                     estimate, ""])
        classes.append(None)
    for name, fit in (entry.get("fit") or {}).items():
        ram, flash = fit.get("ram") or {}, fit.get("flash") or {}
        rows.append([f"↳ fits {name}?", "", "", "", f"margin {ram.get('margin', 0):+,} B",
                     f"margin {flash.get('margin', 0):+,} B", "", str(fit.get("basis", "")),
                     "fits" if fit.get("fits") else "DOES NOT FIT"])
        classes.append("pass" if fit.get("fits") else "fail")
    return rows, classes


def mcu(src) -> Html:
    """The section: TFLM's verdict per format, each NPU, each profile's fit with both margins."""
    if src.mcu is None:
        return section("mcu", "Microcontrollers", note(src.mcu_problem or (
            f"Not checked for microcontrollers: run `featx-edge mcu {src.run.path} --profile cortex-m7-1m` "
            "(the [mcu] extra).")))
    rows: list[list[object]] = []
    classes: list[str | None] = []
    for fmt, entry in (src.mcu.get("formats") or {}).items():
        more, more_classes = _rows(src, fmt, entry if isinstance(entry, dict) else {})
        rows += more
        classes += more_classes
    parts: list[object] = [
        note(f"{src.mcu.get('images')} test images through {src.mcu.get('kernels')}, judged against the Keras "
             "reference with verify's thresholds; the arena is TFLM's recording allocator's figure, flash the "
             f"model's bytes. Latency: {src.mcu.get('latency', '')}."),
        table(_HEADERS, rows, row_classes=classes)]
    if any(c == "stale" for c in classes):
        parts.append(note(f"stale: measured on other files than those there now; run `featx-edge mcu "
                          f"{src.run.path}` again ({MCU_JSON})."))
    return section("mcu", "Microcontrollers", *parts)
