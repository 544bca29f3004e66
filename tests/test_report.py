"""report: RUN/report.html from a run's files; built on small hand-made runs, rendered in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_manifest
from PIL import Image

from featx_edge.report import REPORT, build_report, write_report
from featx_edge.report import sections as report_sections
from featx_edge.rundir.names import VERIFY
from featx_edge.training.run import Run
from featx_edge.verify.runner import PREDICTIONS, PREDICTIONS_SCHEMA

HOSTILE = "<img src=x onerror=alert(1)>&\"q'"
FORMATS = ("tflite-float32", "tflite-int8")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_run(tmp_path: Path, *, labels=("cat", HOSTILE), per_class: int = 3, weights: str = "imagenet") -> Path:
    """A run directory with everything the report reads (no real model: artifacts are random bytes)."""
    data = tmp_path / "data"
    test = []
    for c, label in enumerate(labels):
        (data / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (40 * c + 20 * i, 90, 200)).save(data / label / f"{i}.png")
            test.append(f"{label}/{i}.png")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    artifacts = {}
    for fmt in FORMATS:
        blob = fmt.encode() * 10
        (run / "export" / f"model.{fmt}.tflite").write_bytes(blob)
        artifacts[fmt] = {"path": f"export/model.{fmt}.tflite", "sha256": _sha(blob), "bytes": len(blob)}
    (run / "splits.json").write_text(json.dumps({"data_root": str(data), "classes": list(labels), "seed": 0,
                                                 "train": [], "val": [], "test": test}))
    history = {"loss": [1.0, 0.5, 0.3], "accuracy": [0.5, 0.8, 0.9], "val_loss": [1.1, 0.6, 0.4],
               "val_accuracy": [0.4, 0.7, 0.85]}
    manifest = make_manifest(
        labels=labels, backbone={"name": "efficientnet_lite0", "alpha": None, "weights": weights, "weights_sha256": None},
        artifacts=artifacts, featx_edge_version="0.1.0",
        input={"height": 96, "width": 96, "channels": 3, "dtype": "float32", "value_range": [0, 255]},
        data={"root": str(data), "splits": "splits.json", "counts": {"train": 0, "val": 0, "test": len(test)}},
        reference={"path": "model.weights.h5", "sha256": "ref-sha"},
        training={"stage1": {"epochs": 3, "history": history}, "val_accuracy": 0.85, "test_accuracy": 0.8})
    (run / "manifest.json").write_text(json.dumps(manifest))
    truth = [c for c in range(len(labels)) for _ in range(per_class)]
    int8 = list(truth)
    int8[1] = 1 - int8[1]  # one disagreement: image cat/1.png
    entries = {fmt: {"sha256": artifacts[fmt]["sha256"], "accuracy": acc, "accuracy_ci95": [0.5, 1.0],
                     "top1_agreement": agree, "top1_agreement_ci95": [0.6, 1.0], "accuracy_change_points": 0.0,
                     "accuracy_change_ci95_points": [-1.0, 1.0], "max_abs_diff": 0.01,
                     "thresholds": {"min_agreement": 0.97, "max_accuracy_drop": 1.0, "max_abs_diff": None,
                                    "min_sqnr_db": None}, "passed": True, "failures": []}
               for fmt, acc, agree in (("tflite-float32", 1.0, 1.0), ("tflite-int8", 0.8333, 0.8333))}
    (run / VERIFY).write_text(json.dumps({"images": len(test), "reference_accuracy": 1.0,
                                          "reference_accuracy_ci95": [0.6, 1.0], "reference_sha256": "ref-sha",
                                          "formats": entries, "passed": True}))
    scores = [0.9] * len(test)
    (run / PREDICTIONS).write_text(json.dumps({
        "schema": PREDICTIONS_SCHEMA, "images": test, "labels": truth,
        "reference": {"sha256": "ref-sha", "top1": truth, "score": scores},
        "formats": {"tflite-float32": {"sha256": artifacts["tflite-float32"]["sha256"], "top1": truth,
                                       "score": scores},
                    "tflite-int8": {"sha256": artifacts["tflite-int8"]["sha256"], "top1": int8,
                                    "score": [0.55] * len(test)}}}))
    return run


def _row(html: str, fmt: str) -> str:
    """The verify table's row of ``fmt``."""
    section = html.split('<section id="verify">', 1)[1].split("</section>", 1)[0]
    match = re.search(r'<tr( class="[^"]*")?><td>' + re.escape(fmt) + r"</td>.*?</tr>", section)
    assert match, f"no verify row for {fmt}"
    return match.group(0)


def _section(html: str, anchor: str) -> str:
    return html.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def _text(html: str) -> str:
    """What a reader sees: tags dropped, entities decoded."""
    import html as html_module

    return html_module.unescape(re.sub(r"<[^>]+>", "", html))


def test_labels_from_folder_names_are_escaped(tmp_path):
    html = build_report(Run.open(make_run(tmp_path)))
    assert HOSTILE not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;q&#x27;" in html
    # No request can leave the page: every image is inline, no link or script points elsewhere.
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, flags=re.IGNORECASE)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img src="([^"]*)"', html))
    assert "<script" not in html.lower()


def test_verify_rows_current_failed_and_stale(tmp_path):
    run = make_run(tmp_path)
    html = build_report(Run.open(run))
    assert 'class="pass"' in _row(html, "tflite-int8") and ">0.8333 [0.600, 1.000]<" in _row(html, "tflite-int8")
    # The int8 file is exported again after verify: its entry is about another file.
    manifest = json.loads((run / "manifest.json").read_text())
    blob = b"a new int8 export"
    (run / "export" / "model.tflite-int8.tflite").write_bytes(blob)
    manifest["artifacts"]["tflite-int8"].update(sha256=_sha(blob), bytes=len(blob))
    (run / "manifest.json").write_text(json.dumps(manifest))
    verify = json.loads((run / VERIFY).read_text())
    verify["formats"]["tflite-float32"].update(passed=False, failures=["max |dprob| 0.3 > 0.0001"])
    (run / VERIFY).write_text(json.dumps(verify))
    html = build_report(Run.open(run))
    stale = _row(html, "tflite-int8")
    assert 'class="stale"' in stale and "measured on an earlier export" in stale and "pass" not in stale
    failed = _row(html, "tflite-float32")
    assert 'class="fail"' in failed and "max |dprob| 0.3 &gt; 0.0001" in failed
    # Its per-image predictions are stale too: no matrix, no gallery for it, and the fix is named.
    confusion = _section(html, "confusion")
    assert "tflite-int8: predictions are stale" in confusion and f"featx-edge verify {run}" in confusion
    assert "<h3>tflite-int8:" not in confusion and "<h3>tflite-float32: 6/6 right</h3>" in confusion
    assert "No int8 export with current predictions" in _section(html, "gallery")


def test_confusion_matrices_and_gallery_from_recorded_predictions(tmp_path):
    html = build_report(Run.open(make_run(tmp_path)))
    confusion = _section(html, "confusion")
    assert "<h3>keras (reference): 6/6 right</h3>" in confusion and "<h3>tflite-int8: 5/6 right</h3>" in confusion
    gallery = _section(html, "gallery")
    assert "1 of 6 test images" in gallery and gallery.count('class="card"') == 1
    assert "cat/1.png" in gallery and 'src="data:image/png;base64,' in gallery
    assert "reference: cat (0.90)" in gallery and "tflite-int8: &lt;img src=x" in gallery and "(0.55)" in gallery


def test_gallery_is_capped(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    preds = json.loads((run / PREDICTIONS).read_text())
    preds["formats"]["tflite-int8"]["top1"] = [1 - t for t in preds["labels"]]  # disagrees everywhere
    (run / PREDICTIONS).write_text(json.dumps(preds))
    monkeypatch.setattr(report_sections, "GALLERY_MAX", 2)
    gallery = _section(build_report(Run.open(run)), "gallery")
    assert gallery.count('class="card"') == 2 and "and 4 more not shown" in gallery


def test_missing_predictions_and_verify_name_the_fix(tmp_path):
    run = make_run(tmp_path)
    (run / PREDICTIONS).unlink()
    html = build_report(Run.open(run))
    for anchor in ("confusion", "gallery"):
        shown = _text(_section(html, anchor))
        assert f"no per-image predictions ({PREDICTIONS}); run featx-edge verify {run} to record them" in shown
    assert f"<code>featx-edge verify {run}</code>" in _section(html, "confusion")
    (run / VERIFY).unlink()
    assert f"has no {VERIFY}; run featx-edge verify {run}." in _text(_section(build_report(Run.open(run)), "verify"))


def test_weights_none_banner_and_no_bench_yet(tmp_path):
    html = build_report(Run.open(make_run(tmp_path, weights="none")))
    assert 'class="banner"' in html and "--weights none" in html
    assert "Not benchmarked yet" in _section(html, "bench") and "Not measured in this run" in html
    assert 'class="banner"' not in build_report(Run.open(make_run(tmp_path / "b")))


def test_cli_writes_the_report_and_names_the_fix_for_a_non_run(tmp_path, capsys):
    from featx_edge.cli import main

    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / REPORT}"
    assert (run / REPORT).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a featx-edge run directory" in capsys.readouterr().err


def test_run_writes_the_report_when_verify_fails_and_still_exits_non_zero(tmp_path, monkeypatch, capsys):
    """`featx-edge run` ends with the report, also (above all) when verify fails."""
    import featx_edge.export
    import featx_edge.training.train
    import featx_edge.verify.runner
    from featx_edge.cli import main
    from featx_edge.errors import VerificationError

    made = make_run(tmp_path / "made")
    out = tmp_path / "out"

    def fake_verify(run, *, kernels=None):
        verify = json.loads((Path(run) / VERIFY).read_text())
        verify["passed"] = False
        verify["formats"]["tflite-int8"].update(passed=False, failures=["top-1 agreement 0.8333 < 0.97"])
        (Path(run) / VERIFY).write_text(json.dumps(verify))
        raise VerificationError("1 check(s) failed")

    # Stand-ins for the stages (whatever options the CLI passes them): a trained and exported run.
    monkeypatch.setattr(featx_edge.training.train, "train_run", lambda config, o, **options: shutil.copytree(made, o))
    monkeypatch.setattr(featx_edge.export, "export_run",
                        lambda o, **options: json.loads((made / "manifest.json").read_text()))
    monkeypatch.setattr(featx_edge.verify.runner, "verify_run", fake_verify)
    assert main(["run", "--out", str(out), "--quiet"]) == 2
    assert "1 check(s) failed" in capsys.readouterr().err
    row = _row((out / REPORT).read_text(encoding="utf-8"), "tflite-int8")
    assert 'class="fail"' in row and "top-1 agreement 0.8333 &lt; 0.97" in row


def test_a_report_that_cannot_be_written_is_a_warning_after_run(tmp_path, caplog):
    from featx_edge.report import report_after_run

    missing = tmp_path / "gone"
    with caplog.at_level("WARNING", logger="featx_edge.report"):
        assert report_after_run(missing) is None
    assert f"Retry with `featx-edge report {missing}`" in caplog.text and "not a featx-edge run" in caplog.text


def test_report_holds_the_run_lock(tmp_path):
    from featx_edge.errors import RunDirError
    from featx_edge.files.lock import lock_path

    run = make_run(tmp_path)
    script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)")
    holder = subprocess.Popen(["python", "-c", script, str(lock_path(run))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by another featx-edge command"):
            write_report(run)
    finally:
        holder.kill()
        holder.wait()
    assert not (run / REPORT).exists()


# -- the real run, rendered by a browser ------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", *args], capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install chromium`): the report "
                                             "cannot be rendered in a browser here")
def test_report_of_the_main_run_renders_in_chromium(trained_run, tmp_path, capsys):
    from featx_edge.cli import main

    assert (trained_run / REPORT).is_file(), "`featx-edge run` writes the report at its end"
    assert main(["report", str(trained_run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {trained_run / REPORT}"
    page = trained_run / REPORT
    html = page.read_text(encoding="utf-8")
    assert page.stat().st_size < 1_500_000, page.stat().st_size
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, flags=re.IGNORECASE)
    assert "http://" not in html and "https://" not in html

    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"
    assert max(count for count, _ in colours) < 0.95 * 1200 * 2000, "the screenshot is mostly one colour"

    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    verify = json.loads((trained_run / VERIFY).read_text())
    for fmt, row in verify["formats"].items():
        cells = _row(dom.stdout, fmt)
        assert f"{row['accuracy']:.4f}" in cells and f"{row['top1_agreement']:.4f}" in cells, (fmt, cells)
        assert 'class="pass"' in cells
    assert f"{verify['reference_accuracy']:.4f}" in text
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert all(label in text for label in manifest["labels"])
    assert "Confusion matrices" in text and "keras (reference):" in text
    assert "run `featx-edge verify" not in text, "predictions recorded by verify were found"
