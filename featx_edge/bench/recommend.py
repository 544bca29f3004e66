"""Which export to ship for this host, chosen from the bench rows among exports that pass verify.

Two picks: the lowest median latency at batch 1 (interactive use) and the highest throughput at
any batch (bulk use), each with its reason in one line (latency against the fastest float32,
size, accuracy change from verify). An int8 export slower than its float32 sibling on the same
runtime, threads and batch is flagged with the likely cause.
"""

from __future__ import annotations

from pathlib import Path

from featx_edge.errors import RunDirError
from featx_edge.formats.registry import FORMAT_SPECS
from featx_edge.formats.targets import detect_host
from featx_edge.verify.record import Entry, read_record


def current_verify_entries(run: Path, manifest: dict) -> dict[str, Entry]:
    """verify.json's entries that were measured on the files exported now (stale ones left out).

    A missing or damaged record gives none: the bench's accuracy note (``plan.accuracy_lookup``)
    already names the damage, and nothing unverified is recommended.
    """
    try:
        record = read_record(run)
    except RunDirError:
        return {}
    return {} if record is None else record.current(manifest=manifest)


def verify_status(entries: dict[str, Entry]) -> dict[str, str]:
    """``pass`` or ``FAIL`` per format, for entries from ``current_verify_entries``."""
    return {fmt: "pass" if entry.passed else "FAIL" for fmt, entry in entries.items()}


def passed_entries(entries: dict[str, Entry]) -> dict[str, Entry]:
    """The entries (from ``current_verify_entries``) that passed: the exports a user may ship."""
    return {fmt: entry for fmt, entry in entries.items() if entry.passed}


def recommend(rows: list[dict], *, verified: dict[str, dict], quantization: dict[str, dict],
              host: str | None = None) -> dict:
    """The picks and flags; ``quantization``: each format's recipe from its model metadata."""
    host = host or detect_host()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("p50_ms")]
    flags = [flag for r in ok if (flag := _slow_int8(r, ok, quantization, host))]
    shippable = [r for r in ok if r["format"] in verified and _kernel_set_passed(r, verified[r["format"]])
                 and _verified_here(r["format"], verified[r["format"]], host)]
    result: dict = {"host_target": host, "among": sorted({r["format"] for r in shippable}), "flags": flags}
    elsewhere = sorted({r["format"] for r in ok if r["format"] in verified
                        and not _verified_here(r["format"], verified[r["format"]], host)})
    if elsewhere:
        result["verified_elsewhere"] = elsewhere
    if not shippable:
        result["note"] = ("no measured export has a passing verify entry for its current file; run "
                          "`featx-edge verify RUN` and bench again" if ok else "nothing was measured")
        return result
    batch1 = [r for r in shippable if r["batch"] == 1]
    if batch1:
        best = min(batch1, key=lambda r: r["p50_ms"])
        result["batch1"] = _pick(best, batch1, verified, key="p50_ms")
    best = max(shippable, key=lambda r: r.get("throughput_ips") or 0.0)
    result["throughput"] = _pick(best, shippable, verified, key="throughput_ips")
    return result


_RUNTIME_KERNELS = {"litert-xnnpack": "xnnpack", "litert-builtin": "builtin"}


def _kernel_set_passed(row: dict, entry: dict) -> bool:
    """A row's runtime must not be a kernel set on which verify failed the file (gated or not)."""
    measured = (entry.get("kernels") or {}).get(_RUNTIME_KERNELS.get(row.get("runtime"), ""))
    return measured is None or bool(measured.get("passed"))


def _verified_here(fmt: str, entry: dict, host: str) -> bool:
    """An int8 file's verdict holds on the kind of CPU it was verified on (its kernels differ by CPU);
    entries from before this was recorded are taken as verified here."""
    spec = FORMAT_SPECS.get(fmt)
    return not (spec and spec.int8) or entry.get("verified_on", host) == host


def _pick(best: dict, pool: list[dict], verified: dict, *, key: str) -> dict:
    floats = [r for r in pool
              if not FORMAT_SPECS.get(r["format"]) or FORMAT_SPECS[r["format"]].mac_arithmetic == "float32"]
    baseline = (min(floats, key=lambda r: r["p50_ms"]) if key == "p50_ms"
                else max(floats, key=lambda r: r.get("throughput_ips") or 0.0)) if floats else None
    change = verified[best["format"]].get("accuracy_change_points")
    size = None if best.get("model_bytes") is None else best["model_bytes"] / 1e6
    if key == "p50_ms":
        what = f"p50 {best['p50_ms']:.2f} ms at batch 1"
        versus = (f", {baseline['p50_ms'] / best['p50_ms']:.1f}x faster than the fastest float32 "
                  f"({baseline['format']} on {baseline['runtime']}, {baseline['p50_ms']:.2f} ms)"
                  if baseline and baseline is not best else "")
    else:
        what = f"{best['throughput_ips']:.0f} images/s at batch {best['batch']}"
        versus = (f", {best['throughput_ips'] / baseline['throughput_ips']:.1f}x the best float32 "
                  f"({baseline['format']} on {baseline['runtime']}, {baseline['throughput_ips']:.0f} images/s)"
                  if baseline and baseline is not best and baseline.get("throughput_ips") else "")
    reason = (what + versus + ("" if size is None else f"; {size:.2f} MB")
              + ("" if change is None else f"; accuracy {change:+.2f} points versus the Keras reference (verify)"))
    return {"format": best["format"], "runtime": best["runtime"], "threads": best["threads"],
            "batch": best["batch"], "p50_ms": best["p50_ms"], "throughput_ips": best.get("throughput_ips"),
            "reason": reason}


def _slow_int8(row: dict, ok: list[dict], quantization: dict, host: str) -> dict | None:
    spec = FORMAT_SPECS.get(row["format"])
    sibling = spec.float_sibling if spec else None
    if sibling is None:
        return None
    twin = next((r for r in ok if r["format"] == sibling and r["runtime"] == row["runtime"]
                 and r["threads"] == row["threads"] and r["batch"] == row["batch"]), None)
    if twin is None or row["p50_ms"] <= twin["p50_ms"]:
        return None
    recipe = quantization.get(row["format"]) or {}
    if row["runtime"] == "litert-builtin":
        cause = "LiteRT's built-in kernels (no XNNPACK): its reference int8 kernels are not optimised"
    elif row["format"] == "onnx-int8" and recipe.get("activations", "int8") == "int8" and host.startswith("x86"):
        better = "x86-64-vnni" if host == "x86-64-vnni" else "x86-64"
        cause = (f"int8 activations (S8S8, target {recipe.get('target', 'portable')}) take onnxruntime's slow "
                 f"path on x86-64; export with `--target {better}` (U8S8) for this host, and verify it")
    elif host == "x86-64":
        cause = "this CPU has no VNNI: int8 dot products are no faster than float32 FMA here"
    elif row["format"] == "tflite-dynamic":
        cause = "dynamic-range quantization converts activations at run time; it saves size, not time"
    else:
        cause = "not known; compare on the target device (`featx-edge device-check`) before choosing"
    return {"format": row["format"], "runtime": row["runtime"], "threads": row["threads"], "batch": row["batch"],
            "p50_ms": row["p50_ms"], "float32_p50_ms": twin["p50_ms"], "float32": sibling, "likely_cause": cause}


def format_recommendation(rec: dict) -> list[str]:
    """Markdown lines for bench.md."""
    lines = ["", f"## What to ship on this host ({rec.get('host_target')})", ""]
    if rec.get("note"):
        lines.append(f"- {rec['note']}")
    if rec.get("verified_elsewhere"):
        lines.append(f"- not considered: {', '.join(rec['verified_elsewhere'])} (int8, verified on another kind "
                     "of CPU; int8 kernels differ between CPUs: run `featx-edge verify RUN` here first)")
    for key, title in (("batch1", "lowest latency, batch 1"), ("throughput", "highest throughput")):
        pick = rec.get(key)
        if pick:
            lines.append(f"- **{title}**: {pick['format']} on {pick['runtime']}, {pick['threads']} thread(s): "
                         f"{pick['reason']}")
    groups: dict[tuple, list[dict]] = {}
    for flag in rec.get("flags") or []:  # one line per export and runtime, its settings listed in it
        groups.setdefault((flag["format"], flag["runtime"], flag["float32"], flag["likely_cause"]), []).append(flag)
    for (fmt, runtime, float32, cause), flags in groups.items():
        measured = "; ".join(f"threads {f['threads']}, batch {f['batch']}: {f['p50_ms']:.2f} ms against "
                             f"{f['float32_p50_ms']:.2f} ms" for f in flags)
        lines.append(f"- slower than {float32}: {fmt} on {runtime} ({measured}); likely cause: {cause}")
    return lines
