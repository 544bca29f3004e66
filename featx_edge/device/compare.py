"""Host-side judgement of one format on one emulated core: agreement, |Δp|, pass or fail.

For a run, the verdict is verify's gate on the device: the core's outputs on the test split
against the Keras reference's (top-1 agreement and accuracy change with their intervals, the
format's thresholds and tie rule, ``fidelity.compare``/``check``). The comparison with this host
is then information: a quantized model may round differently on another core and still match the
original model. Without a reference (a bare model file) the verdict is the two comparisons below,
both against the format's self-test tolerance (``FormatSpec.selftest_tolerance``, never loosened):

- with the host: the same model and images through the host's runtime. Max |Δp| must stay within
  the tolerance. Top-1 agreement is reported but not gated separately: with |Δp| within the
  tolerance everywhere, a top-1 change can only happen on a near-tie (the host's top two within
  twice the tolerance), which is numerics, not a fault.
- with the export: the golden self-test files, as ``featx-edge selftest`` checks them on a device
  (top-1 equal to the Keras reference's on every image, |Δp| to the exported model's outputs at
  export time within the tolerance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from featx_edge.fidelity.gate import check, compare
from featx_edge.runtime.predictor import nonfinite_rows

SPEED_NOTE = "emulated cores: agreement only, not speed"


@dataclass(frozen=True)
class Row:
    """One format on one core. ``max_diff_*`` is None when an output was not finite."""

    target: str
    format: str
    core: str
    tolerance: float
    images: int = 0
    top1_host: int = 0
    max_diff_host: float | None = None
    selftest_images: int = 0
    selftest_top1: int = 0
    max_diff_export: float | None = None
    over_host: int = 0  # check images whose |dprob| versus the host exceeds the tolerance
    nonfinite: int = 0  # images (check and self-test) whose guest outputs hold a NaN or an Inf
    error: str | None = None
    gate: dict | None = None  # a run's verdict against the Keras reference: metrics and ``failures``

    @property
    def problems(self) -> list[str]:
        if self.error is not None:
            return [self.error]
        found = []
        if self.nonfinite:  # one reason, with the count: the max |dprob| of a NaN says nothing more
            found.append(f"{self.nonfinite} of {self.images + self.selftest_images} images gave NaN/Inf outputs "
                         f"(not finite) on {self.core}")
        if self.gate is not None:  # verify's gate decides; the host and export-time |dp| are information
            return found + [f"{f} (against the Keras reference on {self.core})" for f in self.gate["failures"]]
        for what, value in (("the host", self.max_diff_host), ("the export-time outputs", self.max_diff_export)):
            if value is None:
                if not self.nonfinite:
                    found.append(f"outputs that are not finite numbers (versus {what})")
            elif value > self.tolerance:
                where = f" (on {self.over_host}/{self.images} images)" if what == "the host" else ""
                found.append(f"max |dprob| versus {what} {value:.3g} exceeds the tolerance {self.tolerance}{where}")
        if self.selftest_top1 < self.selftest_images:
            found.append(f"top-1 equals the export-time reference on only {self.selftest_top1}/"
                         f"{self.selftest_images} self-test images")
        return found

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "top1_agreement_host": self.top1_host / self.images if self.images else None,
                "passed": self.passed, "problems": self.problems}


def compare_outputs(*, target: str, fmt: str, core: str, tolerance: float, guest_test, host_test,
                    guest_selftest, reference, expected, gate: dict | None = None) -> Row:
    """Judge the guest's probabilities: ``*_test`` on the check images, ``guest_selftest`` on the golden
    images (``reference``: the Keras model's outputs, ``expected``: the exported model's, at export time).
    ``gate`` (a run): the Keras reference's outputs on the check images, their labels, the format's
    ``limits`` and ``tie_margin``; the row then passes or fails on verify's gate.

    Example:
        >>> p = [[0.9, 0.1], [0.2, 0.8]]
        >>> compare_outputs(target="m", fmt="onnx-float32", core="cortex-a53", tolerance=1e-4, guest_test=p,
        ...                 host_test=p, guest_selftest=p, reference=p, expected=p).passed
        True
    """
    pairs = {"check images": (guest_test, host_test), "self-test images": (guest_selftest, expected)}
    arrays = {}
    for what, (guest, truth) in pairs.items():
        guest, truth = np.asarray(guest, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        if guest.shape != truth.shape or guest.ndim != 2:
            return Row(target=target, format=fmt, core=core, tolerance=tolerance,
                       error=f"the guest returned outputs of shape {guest.shape} on the {what}; expected {truth.shape}")
        arrays[what] = (guest, truth)
    (g_test, h_test), (g_self, e_self) = arrays.values()
    reference = np.asarray(reference, dtype=np.float64)
    return Row(target=target, format=fmt, core=core, tolerance=tolerance, images=len(g_test),
               top1_host=int(np.sum(g_test.argmax(1) == h_test.argmax(1))), max_diff_host=_max_diff(g_test, h_test),
               over_host=int(np.sum(~(np.abs(g_test - h_test) <= tolerance).all(1))) if g_test.size else 0,
               selftest_images=len(g_self), selftest_top1=int(np.sum(g_self.argmax(1) == reference.argmax(1))),
               max_diff_export=_max_diff(g_self, e_self), nonfinite=nonfinite_rows(g_test) + nonfinite_rows(g_self),
               gate=_gate(g_test, gate))


_GATE_KEPT = ("images", "judged_top1_agreement", "judged_top1_agreement_ci95", "judged_accuracy_change_points",
              "judged_accuracy_change_ci95_points", "top1_agreement", "accuracy", "near_ties", "tie_margin")


def _gate(guest: np.ndarray, gate: dict | None) -> dict | None:
    """verify's gate on the core's outputs; None without a reference (a bare model file)."""
    if gate is None or nonfinite_rows(guest):
        return None if gate is None else {"failures": []}  # NaN/Inf: reported once, as non-finite
    metrics = compare(guest, np.asarray(gate["reference"], dtype=np.float64), np.asarray(gate["labels"]),
                      tie_margin=gate["tie_margin"])
    return {**{key: metrics[key] for key in _GATE_KEPT}, "failures": check(metrics, gate["limits"])}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    return float(diff.max()) if np.all(np.isfinite(diff)) else None


def format_table(rows: list[Row], *, title: str) -> str:
    """The rows as a fixed-width table with ``title`` and the speed note above it."""
    head = ("target", "format", "core", "agreement vs Keras", "top-1 vs host", "self-test top-1", "max|dp| host",
            "max|dp| export", "tolerance", "result")
    lines = [head]
    for r in rows:
        agreement = "-" if not (r.gate and "judged_top1_agreement" in r.gate) else (
            f"{r.gate['judged_top1_agreement']:.4f} ({r.gate['judged_accuracy_change_points']:+.2f} pt)")
        lines.append((r.target, r.format, r.core, agreement, f"{r.top1_host}/{r.images}" if r.error is None else "-",
                      f"{r.selftest_top1}/{r.selftest_images}" if r.error is None else "-",
                      _num(r.max_diff_host, r), _num(r.max_diff_export, r), f"{r.tolerance:g}",
                      "PASS" if r.passed else "FAIL"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [title, SPEED_NOTE]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    for r in rows:
        text += [f"FAIL {r.target} {r.format} on {r.core}: {p}" for p in r.problems]
    return "\n".join(text)


def _num(value: float | None, row: Row) -> str:
    if row.error is not None:
        return "-"
    return "not finite" if value is None else f"{value:.2g}"
