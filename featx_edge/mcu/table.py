"""The table ``featx-edge mcu`` prints from an ``mcu.json`` report."""

from __future__ import annotations


def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:,.1f} KiB"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """One block per format: TFLM's fidelity and sizes, each NPU, each profile's verdict with both margins."""
    lines = [f"{'format':<22} {'agreement':>9} {'accuracy':>8} {'change':>7} {'arena':>13} {'flash':>13}  result"]
    for fmt, entry in (report.get("formats") or {}).items():
        tflm = entry.get("tflm") or {}
        agreement = tflm.get("judged_top1_agreement", tflm.get("top1_agreement"))
        change = tflm.get("judged_accuracy_change_points", tflm.get("accuracy_change_points"))
        lines.append(f"{fmt + ' (TFLM)':<22} {_num(agreement, '.4f'):>9} {_num(tflm.get('accuracy'), '.4f'):>8} "
                     f"{_num(change, '+.2f'):>7} {_kib(tflm.get('arena_bytes')):>13} "
                     f"{_kib(tflm.get('flash_bytes')):>13}  {'pass' if tflm.get('passed') else 'FAIL'}")
        for accelerator, npu in (entry.get("npu") or {}).items():
            if "error" in npu:
                lines.append(f"  {accelerator}: {npu['error']}")
                continue
            cpu = ", ".join(sorted({op["op"] for op in npu["cpu_ops"]})) or "none"
            lines.append(f"  {accelerator}: {npu['npu_op_share']:.0%} of {npu['npu_ops'] + len(npu['cpu_ops'])} "
                         f"operators on the NPU (CPU: {cpu}), SRAM {_kib(npu['sram_bytes'])}, flash "
                         f"{_kib(npu['flash_bytes'])}, estimated {npu['inference_ms']:.2f} ms at "
                         f"{npu['clock_hz'] / 1e6:.0f} MHz ({npu['system_config']}; Vela's estimate)")
        for name, verdict in (entry.get("fit") or {}).items():
            ram, flash = verdict["ram"], verdict["flash"]
            lines.append(f"  {name}: {'fits' if verdict['fits'] else 'DOES NOT FIT'}; RAM margin {ram['margin']:+,} B "
                         f"(arena {ram['arena']:,} + reserve {ram['reserve']:,} of {ram['available']:,}), flash "
                         f"margin {flash['margin']:+,} B (model {flash['model']:,} + reserve {flash['reserve']:,} of "
                         f"{flash['available']:,})")
        if entry.get("firmware"):
            lines.append(f"  firmware sources: {entry['firmware']['folder']}/")
    lines.append(f"({report.get('images')} test images through TensorFlow Lite Micro's reference kernels, judged "
                 "against the Keras reference as verify judges; the arena is TFLM's recording allocator's figure. "
                 "No latency is measured here: the NPU times are Vela's estimates.)")
    return "\n".join(lines)
