"""`featx-edge bundle`: what a device needs and nothing more, refused when it would not be what was verified.

The fast tests bundle a synthetic run (model files of random bytes with their recorded checksums,
self-test files and verify.json) with a small stand-in wheel. The slow ones bundle the README's main
run with a wheel built from this checkout, install each bundle into a fresh virtual environment as
its README says, and run the README's self-test and predict commands there.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_manifest
from PIL import Image

from featx_edge.bundle.pack import BUNDLE_JSON, bundle_run
from featx_edge.cli import main
from featx_edge.errors import ConfigError, ExportError, RunDirError, VerificationError
from featx_edge.files.atomic import sha256_file
from featx_edge.formats.registry import artifact_filename
from featx_edge.rundir.names import VERIFY

LABELS = ["a", "b", "c"]
BASE_REQUIRES = ["numpy<3,>=1.26", "pillow>=10.3", "onnxruntime<2,>=1.20", "ai-edge-litert<3,>=2.0",
                 'tomli>=2.0; python_version < "3.11"']
ENGINE = {"tflite-int8": "ai-edge-litert", "onnx-int8": "onnxruntime"}


def _wheel(path: Path, requires: list[str]) -> Path:
    """A stand-in featx-edge wheel: only its METADATA matters to bundle."""
    meta = "Metadata-Version: 2.4\nName: featx-edge\nVersion: 0.1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nlong description: Name: other\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("featx_edge-0.1.0.dist-info/METADATA", meta)
        zf.writestr("featx_edge/__init__.py", "")
    return path


@pytest.fixture
def wheel(tmp_path) -> Path:
    return _wheel(tmp_path / "featx_edge-0.1.0-py3-none-any.whl",
                  [*BASE_REQUIRES, 'tensorflow<2.22,>=2.21; extra == "train"', 'pytest>=8; extra == "test"'])


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run with tflite-int8 and onnx-int8 'exports' (random bytes), their self-test files, verified."""
    from featx_edge.runtime.selftest import write_golden

    run = tmp_path / "run"
    images = run / "export" / "selftest" / "images"
    images.mkdir(parents=True)
    names = []
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f"{i:02d}.png")
        names.append(f"images/{i:02d}.png")
    artifacts, formats = {}, {}
    for n, fmt in enumerate(ENGINE):
        path = run / "export" / artifact_filename(fmt)
        path.write_bytes(np.random.default_rng(n).bytes(4096))
        probs = np.eye(3, dtype=np.float32)[:2]
        write_golden(path, fmt=fmt, images=names, reference=probs, expected=probs)
        artifacts[fmt] = {"path": f"export/{path.name}", "sha256": sha256_file(path), "bytes": 4096}
        formats[fmt] = {"sha256": artifacts[fmt]["sha256"], "passed": True, "top1_agreement": 1.0, "failures": []}
    (run / "manifest.json").write_text(json.dumps(make_manifest(labels=LABELS, size=8, artifacts=artifacts,
                                                                featx_edge_version="0.1.0")))
    (run / VERIFY).write_text(json.dumps({"images": 100, "passed": True, "formats": formats}))
    return run


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _commands(readme: str) -> list[str]:
    """The README's ```bash blocks, in order: install, self-test, classify."""
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)]


@pytest.mark.parametrize("fmt", list(ENGINE))
def test_a_bundle_holds_the_model_its_selftest_pins_and_the_wheel_only(fake_run, wheel, tmp_path, fmt):
    out = tmp_path / "bundle"
    bundle = bundle_run(fake_run, fmt=fmt, out=out, wheel=wheel)
    model = artifact_filename(fmt)
    assert _files(out) == {model, f"selftest/{model}.json", "selftest/images/00.png", "selftest/images/01.png",
                           "requirements.txt", wheel.name, "README.md", BUNDLE_JSON, ".featx-edge"}  # its marker
    assert sha256_file(out / model) == sha256_file(fake_run / "export" / model)
    lines = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    other = ({"ai-edge-litert", "onnxruntime"} - {ENGINE[fmt]}).pop()
    assert lines == [f"numpy=={importlib.metadata.version('numpy')}", f"pillow=={importlib.metadata.version('pillow')}",
                     f"{ENGINE[fmt]}=={importlib.metadata.version(ENGINE[fmt])}", 'tomli>=2.0; python_version < "3.11"']
    assert other not in (out / "requirements.txt").read_text()
    meta = json.loads((out / BUNDLE_JSON).read_text())
    assert meta["format"] == fmt and meta["model"]["sha256"] == sha256_file(out / model)
    assert meta["verify"]["status"] == "pass" and meta["verify"]["allowed_unverified"] is False
    assert meta["featx_edge_version"] == "0.1.0" and meta["wheel"]["built_from"] == "--wheel"
    assert meta["requirements"][ENGINE[fmt]] == f"{ENGINE[fmt]}=={importlib.metadata.version(ENGINE[fmt])}"
    readme = (out / "README.md").read_text()
    assert _commands(readme) == [bundle.commands["install"], bundle.commands["selftest"], bundle.commands["predict"]]
    assert f"pip install --no-deps {wheel.name}" in bundle.commands["install"]
    assert bundle.commands["selftest"] == f"featx-edge selftest {model}"
    assert "featx-edge device-check" in readme and "never speed" in readme


def test_a_zip_bundle_has_one_top_folder_and_is_written_whole(fake_run, wheel, tmp_path):
    out = tmp_path / "b.zip"
    bundle_run(fake_run, fmt="onnx-int8", out=out, wheel=wheel)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {"b"} and "b/bundle.json" in names
        assert "unzip b.zip && cd b" in zf.read("b/README.md").decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b.zip", "run", wheel.name, ".run.featx-edge.lock"])


def test_a_format_that_was_not_exported_is_refused(fake_run, wheel, tmp_path, capsys):
    rc = main(["bundle", str(fake_run), "--format", "tflite-float16", "--out", str(tmp_path / "b"),
               "--wheel", str(wheel)])
    err = capsys.readouterr().err
    assert rc == 2 and "not exported" in err and f"featx-edge export {fake_run} --formats tflite-float16" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, status", [
    (lambda v, sha: v["formats"]["tflite-int8"].update(passed=False, failures=["agreement 0.9 < 0.97"]), "FAILED"),
    (lambda v, sha: v["formats"]["tflite-int8"].update(sha256="f" * 64), "stale"),
    (lambda v, sha: v["formats"].pop("tflite-int8"), "not verified"),
])
def test_an_export_that_did_not_pass_verify_is_refused_unless_allowed(fake_run, wheel, tmp_path, capsys, change,
                                                                       status):
    report = json.loads((fake_run / VERIFY).read_text())
    change(report, None)
    (fake_run / VERIFY).write_text(json.dumps(report))
    with pytest.raises(VerificationError, match=f"featx-edge verify {re.escape(str(fake_run))} --formats tflite-int8"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=wheel)
    assert not (tmp_path / "b").exists()
    rc = main(["bundle", str(fake_run), "--format", "tflite-int8", "--out", str(tmp_path / "b"), "--wheel", str(wheel),
               "--allow-unverified"])
    printed = capsys.readouterr()
    assert rc == 0 and "--allow-unverified" in printed.err
    assert f"wrote {tmp_path / 'b'} (tflite-int8, verify: {status})" in printed.out
    assert "  featx-edge selftest model.tflite-int8.tflite\n" in printed.out  # the device commands follow
    meta = json.loads((tmp_path / "b" / BUNDLE_JSON).read_text())
    assert meta["verify"]["status"] == status and meta["verify"]["allowed_unverified"] is True
    assert f"WARNING: not verified ({status})" in (tmp_path / "b" / "README.md").read_text()


def test_a_run_never_verified_is_refused(fake_run, wheel, tmp_path):
    (fake_run / VERIFY).unlink()
    with pytest.raises(VerificationError, match="no entry in verify.json"):
        bundle_run(fake_run, fmt="onnx-int8", out=tmp_path / "b", wheel=wheel)


def test_a_tampered_model_is_refused_even_when_unverified_is_allowed(fake_run, wheel, tmp_path):
    model = fake_run / "export" / artifact_filename("tflite-int8")
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match="sha256 in the manifest"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=wheel, allow_unverified=True)
    assert not (tmp_path / "b").exists()


def test_selftest_files_of_another_export_are_refused(fake_run, wheel, tmp_path):
    golden = fake_run / "export" / "selftest" / f"{artifact_filename('onnx-int8')}.json"
    data = json.loads(golden.read_text())
    data["model_sha256"] = "e" * 64
    golden.write_text(json.dumps(data))
    with pytest.raises(RunDirError, match="device self-test would fail"):
        bundle_run(fake_run, fmt="onnx-int8", out=tmp_path / "b", wheel=wheel)


@pytest.mark.parametrize("name", ["b", "b.zip"])
def test_an_existing_bundle_is_replaced_only_with_overwrite(fake_run, wheel, tmp_path, name):
    out = tmp_path / name
    bundle_run(fake_run, fmt="tflite-int8", out=out, wheel=wheel)
    before = out.stat().st_mtime_ns if out.is_file() else (out / BUNDLE_JSON).read_bytes()
    with pytest.raises(ConfigError, match="pass `--overwrite`"):
        bundle_run(fake_run, fmt="onnx-int8", out=out, wheel=wheel)
    assert before == (out.stat().st_mtime_ns if out.is_file() else (out / BUNDLE_JSON).read_bytes())
    bundle_run(fake_run, fmt="onnx-int8", out=out, wheel=wheel, overwrite=True)
    if out.is_dir():
        assert json.loads((out / BUNDLE_JSON).read_text())["format"] == "onnx-int8"
        assert not (out / artifact_filename("tflite-int8")).exists()  # replaced as a whole
    else:
        with zipfile.ZipFile(out) as zf:
            assert json.loads(zf.read("b/bundle.json"))["format"] == "onnx-int8"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("name", ["mine", "mine.zip"])
def test_other_files_are_never_replaced(fake_run, wheel, tmp_path, name):
    out = tmp_path / name
    if name.endswith(".zip"):
        out.write_bytes(b"not a bundle")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a featx-edge bundle"):
        bundle_run(fake_run, fmt="tflite-int8", out=out, wheel=wheel, overwrite=True)
    assert (out.read_bytes() == b"not a bundle") if out.is_file() else (out / "notes.txt").read_text() == "mine"


def test_a_failure_while_bundling_leaves_nothing(fake_run, wheel, tmp_path, monkeypatch):
    from featx_edge.bundle import pack as bundle

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle, "write_json", dies)
    with pytest.raises(OSError, match="disk full"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=wheel)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", wheel.name, ".run.featx-edge.lock"])


def test_a_wheel_that_would_install_tensorflow_is_refused(fake_run, tmp_path):
    bad = _wheel(tmp_path / "featx_edge-0.0.1-py3-none-any.whl", [*BASE_REQUIRES, "tensorflow>=2.21"])
    with pytest.raises(ExportError, match="requires tensorflow in its base install"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=bad)
    other = tmp_path / "featx_edge-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("other-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: other\nVersion: 1.0\n")
    with pytest.raises(ConfigError, match="not a featx-edge wheel"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=other)
    renamed = tmp_path / "mine.whl"
    renamed.write_bytes((tmp_path / "featx_edge-0.0.1-py3-none-any.whl").read_bytes())
    with pytest.raises(ConfigError, match="named as built"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b", wheel=renamed)
    assert not (tmp_path / "b").exists()


def test_outside_a_checkout_a_wheel_must_be_given(fake_run, tmp_path, monkeypatch):
    import featx_edge

    monkeypatch.setattr(featx_edge, "__file__", str(tmp_path / "site-packages" / "featx_edge" / "__init__.py"))
    with pytest.raises(ConfigError, match="pass `--wheel PATH`"):
        bundle_run(fake_run, fmt="tflite-int8", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


# -- the README's main run, bundled and installed as a device would -----------------------------------


@pytest.fixture(scope="module")
def real_bundles(trained_run, tmp_path_factory) -> dict[str, Path]:
    """The main run's tflite-int8 as a folder and onnx-int8 as a zip, through the CLI, wheel built here."""
    out = tmp_path_factory.mktemp("bundles")
    bundles = {"tflite-int8": out / "int8-tflite", "onnx-int8": out / "int8-onnx.zip"}
    for fmt, path in bundles.items():
        assert main(["bundle", str(trained_run), "--format", fmt, "--out", str(path), "--quiet"]) == 0
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*"))
        print(f"bundle {fmt}: {path.name} {size / 1e6:.2f} MB")  # shown with -s
    return bundles


def _unpacked(path: Path, tmp_path: Path) -> Path:
    """A copy of the bundle as it would sit on the device."""
    import shutil

    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            zf.extractall(tmp_path)
        return tmp_path / path.stem
    return Path(shutil.copytree(path, tmp_path / path.name))


@pytest.mark.slow
def test_the_built_wheel_is_the_runtime_without_tensorflow(real_bundles, trained_run):
    folder = real_bundles["tflite-int8"]
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert meta["model"]["sha256"] == manifest["artifacts"]["tflite-int8"]["sha256"]
    assert meta["wheel"]["built_from"] == "this checkout" and meta["verify"]["status"] == "pass"
    with zipfile.ZipFile(folder / meta["wheel"]["file"]) as zf:
        names = zf.namelist()
        text = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    base = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not [line for line in base if re.search(r"tensorflow|keras|tf2onnx|\bonnx\b", line)]
    assert "featx_edge/runtime/selftest.py" in names and not [n for n in names if "__pycache__" in n]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite-int8", "onnx-int8"])
def test_a_bundle_installs_and_runs_on_a_fresh_python_without_tensorflow(real_bundles, trained_run, tmp_path, fmt):
    from featx_edge.data.folders import load_splits
    from featx_edge.runtime import load

    folder = _unpacked(real_bundles[fmt], tmp_path)
    install, selftest, predict = _commands((folder / "README.md").read_text())
    splits = load_splits(trained_run / "splits.json")
    image = splits.root / splits.test[0]
    assert " photos/ " in predict
    script = "\n".join(["set -e", install, selftest, predict.replace(" photos/ ", f" {image} ") + " --json",
                        "python -c 'import featx_edge; print(featx_edge.__file__)'",
                        # featx-edge installed from a wheel packs itself back into one (`bundle` outside a checkout)
                        ("mkdir repacked && python -c 'from pathlib import Path; from featx_edge.bundle.own_wheel import "
                         "repack_installed; repack_installed(Path(\"repacked\"))'"),
                        "python -c 'import tensorflow' 2>/dev/null && echo TENSORFLOW-IMPORTABLE || true"])
    # A clean shell: this environment's bin/ (TensorFlow, featx-edge from the checkout) off PATH, and `python3`
    # the interpreter it was made from, so the pins (made for this Python) install.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin")] + [p for p in env["PATH"].split(os.pathsep)
                                                              if Path(p) != Path(sys.executable).parent])
    done = subprocess.run(["bash", "-c", script], check=False, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0 and re.search(r"No matching distribution|Could not find a version|NewConnectionError|"
                                          r"Temporary failure in name resolution", done.stderr):
        pytest.skip(f"pip cannot reach a package index here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert any(re.match(rf"PASS {re.escape(artifact_filename(fmt))}: (\d+) images, top-1 \1/\1,", line)
               for line in out), out
    assert str(folder / ".venv") in next(line for line in out if line.endswith("__init__.py"))
    assert "TENSORFLOW-IMPORTABLE" not in out
    (device,) = [json.loads(line) for line in out if line.startswith("{")]
    (host,) = load(trained_run / "export" / artifact_filename(fmt)).predict([image], top_k=3)
    assert device["label"] == host.label
    (repacked,) = (folder / "repacked").glob("featx_edge-*-py3-none-any.whl")
    (original,) = folder.glob("featx_edge-*.whl")
    with zipfile.ZipFile(original) as a, zipfile.ZipFile(repacked) as b:
        assert repacked.name == original.name and set(a.namelist()) == set(b.namelist())
        assert all(a.read(n) == b.read(n) for n in a.namelist() if not n.endswith("/RECORD")), "same files"
        record = b.read(next(n for n in b.namelist() if n.endswith("/RECORD"))).decode()
    assert "featx_edge/runtime/predictor.py,sha256=" in record
