"""One verify record (featx_edge/verify/record.py), one run-file table, a complete FormatSpec, one integer check.

Fast: synthetic runs (random bytes for models) from test_report and test_bundle; nothing is trained.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import one_line_error
from test_bundle import fake_run, wheel  # noqa: F401  (fixtures: a verified fake run, a stand-in wheel)
from test_report import _section, _text, make_run

from featx_edge.cli import main
from featx_edge.errors import ConfigError, RunDirError, check_int
from featx_edge.formats.registry import (
    FORMAT_SPECS,
    MODEL_SUFFIXES,
    budget_candidates,
    engine_for_file,
    int8_arithmetic,
    mac_count_formats,
)
from featx_edge.rundir import names
from featx_edge.rundir.names import VERIFY
from featx_edge.verify.record import Stale, parse_record, read_record, staleness, write_record

PACKAGE = Path(__file__).resolve().parents[1] / "featx_edge"
SHA = "a" * 64
MANIFEST = {"reference": {"sha256": "ref"}, "artifacts": {"tflite-int8": {"sha256": SHA}}}


# -- the one staleness rule ------------------------------------------------------------------
@pytest.mark.parametrize("fmt, sha256, problems, kind", [
    ("tflite-int8", SHA, None, None),
    ("onnx-int8", SHA, None, Stale.NOT_EXPORTED),
    ("tflite-int8", SHA, {"tflite-int8": ["sha256 does not match"]}, Stale.FILE_CHANGED),
    ("tflite-int8", None, None, Stale.NO_SHA256),
    ("tflite-int8", "b" * 64, None, Stale.EARLIER_EXPORT),
])
def test_the_staleness_rule(fmt, sha256, problems, kind):
    verdict = staleness(fmt, sha256, manifest=MANIFEST, file_problems=problems)
    assert (verdict.kind if verdict else None) is kind
    if kind is Stale.FILE_CHANGED:
        assert str(verdict) == "the file changed since export: sha256 does not match"


def test_an_entry_against_an_earlier_reference_is_stale_whatever_its_sha256(tmp_path):
    raw = {"reference_sha256": "old", "formats": {"tflite-int8": {"sha256": SHA, "passed": True}}}
    record = parse_record(raw, path=tmp_path / VERIFY)
    assert record.staleness("tflite-int8", manifest=MANIFEST).kind is Stale.EARLIER_REFERENCE
    assert record.current(manifest=MANIFEST) == {}
    same = parse_record({**raw, "reference_sha256": "ref"}, path=tmp_path / VERIFY)
    assert list(same.current(manifest=MANIFEST)) == ["tflite-int8"]


def test_bench_recommend_and_report_agree_on_a_stale_entry(tmp_path):
    """The same entry, measured on another file than the one exported now, is stale to every reader."""
    from featx_edge.bench.plan import accuracy_lookup
    from featx_edge.bench.recommend import current_verify_entries
    from featx_edge.report.sections import Sources, verify_status
    from featx_edge.training.run import Run

    run = make_run(tmp_path)
    raw = json.loads((run / VERIFY).read_text())
    raw["formats"]["tflite-int8"]["sha256"] = "f" * 64
    (run / VERIFY).write_text(json.dumps(raw))
    manifest = json.loads((run / "manifest.json").read_text())
    per_format, _, _, note = accuracy_lookup(run, manifest)
    assert list(per_format) == ["tflite-float32"] and "stale for tflite-int8" in note
    assert list(current_verify_entries(run, manifest)) == ["tflite-float32"]
    src = Sources(Run.open(run))
    assert verify_status(src, src.verify.entries["tflite-int8"]) == (
        "stale", "measured on an earlier export of this format")
    assert verify_status(src, src.verify.entries["tflite-float32"]) == ("pass", "")


# -- reading: one error line for a damaged record --------------------------------------------
DAMAGED = [
    (b"{not json", "Expecting property name"),
    (b"\xff\xfe", "unreadable"),
    (b"[1, 2]", "holds a JSON array, not an object"),
    (b'{"formats": []}', "`formats` has type list; expected an object"),
    (b'{"formats": {"tflite-int8": 3}}', "`formats.tflite-int8` has type int; expected an object"),
    (b'{"formats": {"tflite-int8": {"sha256": 7}}}', "`formats.tflite-int8.sha256` has type int; expected a string"),
    (b'{"formats": {"tflite-int8": {"passed": "yes"}}}', "`formats.tflite-int8.passed` has type str; expected true or false"),
]


@pytest.mark.parametrize("content, problem", DAMAGED)
def test_a_damaged_record_is_one_line_through_bundle(fake_run, wheel, tmp_path, capsys, content, problem):  # noqa: F811
    (fake_run / VERIFY).write_bytes(content)
    rc = main(["bundle", str(fake_run), "--format", "tflite-int8", "--out", str(tmp_path / "b"),
               "--wheel", str(wheel)])
    assert rc == 2
    one_line_error(capsys, f"`{fake_run / VERIFY}` is damaged (", problem, f"run `featx-edge verify {fake_run}`")
    assert not (tmp_path / "b").exists()


def test_a_damaged_record_is_named_on_the_report_page_and_in_bench(tmp_path, capsys):
    from featx_edge.bench.plan import accuracy_lookup
    from featx_edge.bench.recommend import current_verify_entries

    run = make_run(tmp_path)
    (run / VERIFY).write_text('{"formats": {"tflite-int8": 3}}')
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().err == ""
    shown = _text(_section((run / names.REPORT).read_text(encoding="utf-8"), "verify"))
    assert (f"{run / VERIFY} is damaged (formats.tflite-int8 has type int; expected an object); run featx-edge "
            f"verify {run} again to rewrite it.") in shown
    manifest = json.loads((run / "manifest.json").read_text())
    per_format, _, _, note = accuracy_lookup(run, manifest)  # the bench runs on, and says why
    assert per_format == {} and note == str(pytest.raises(RunDirError, read_record, run).value)
    assert current_verify_entries(run, manifest) == {}  # nothing unverified is recommended


def test_write_record_refuses_what_could_not_be_read_back(tmp_path):
    with pytest.raises(TypeError, match="passed"):
        write_record(tmp_path, {"formats": {"tflite-int8": {"passed": "yes"}}})
    assert not (tmp_path / VERIFY).exists()
    write_record(tmp_path, {"images": 3, "passed": True, "formats": {"tflite-int8": {"sha256": SHA, "passed": True}}})
    record = read_record(tmp_path)
    assert record.images == 3 and record.entries["tflite-int8"].passed and read_record(tmp_path / "none") is None


# -- FormatSpec ------------------------------------------------------------------------------
def test_formatspec_knows_sibling_macs_budget_suffix_and_device_tolerance():
    for name, spec in FORMAT_SPECS.items():
        assert (spec.mac_arithmetic in ("int8", "int16x8")) == spec.int8, name
        assert spec.device_tolerance == spec.selftest_tolerance
        assert engine_for_file(f"x/model.{name}{spec.extension.upper()}") == spec.engine
        if spec.float_sibling is not None:
            sibling = FORMAT_SPECS[spec.float_sibling]
            assert sibling.mac_arithmetic == "float32" and sibling.engine == spec.engine, name
        else:
            assert not spec.int8 and spec.quantization != "dynamic", name
    assert FORMAT_SPECS["onnx-int8"].float_sibling == "onnx-float32"
    assert FORMAT_SPECS["tflite-int8-qat"].float_sibling == "tflite-float32"
    assert mac_count_formats() == ("onnx-float32", "tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8")
    assert budget_candidates(qat=False) == ("tflite-int8", "tflite-int8-selective")
    assert budget_candidates(qat=True) == ("tflite-int8", "tflite-int8-selective", "tflite-int8-qat")
    assert set(MODEL_SUFFIXES) == {".tflite", ".onnx"} and engine_for_file("model.h5") is None
    assert int8_arithmetic("onnx-int8") and not int8_arithmetic("tflite-int16x8")
    assert not int8_arithmetic("keras (reference)")


NAME_TESTS = [
    r"""["']int8["']\s+(not\s+)?in\b""", r"""["'](onnx|tflite)["']\s+(not\s+)?in\b""",
    r"""\.(startswith|endswith)\(\s*["'](onnx|tflite|\.onnx|\.tflite|float32|float16|int8)""",
    r"""suffix(\.lower\(\))?\s*[!=]=\s*["']\.(onnx|tflite)""", r"\bFLOAT_SIBLING\b",
]


def test_no_format_name_or_suffix_tests_outside_the_registry():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "formats":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(re.search(pattern, line) for pattern in NAME_TESTS):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "ask featx_edge.formats.registry (FormatSpec) instead:\n" + "\n".join(found)


# -- the run-file table ----------------------------------------------------------------------
def test_run_file_names_come_from_the_table():
    from featx_edge.runtime.selftest import SELFTEST_DIR

    assert names.SELFTEST_DIR == SELFTEST_DIR  # the runtime, below rundir, names the same folder
    files = {name for name in names.RUN_FILES if "." in name}  # "export" is also a command's name
    found = [f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}"
             for path in PACKAGE.rglob("*.py") if path != PACKAGE / "rundir" / "names.py"
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and node.value in files]
    assert not found, "use featx_edge.rundir.names:\n" + "\n".join(found)


# -- one integer check -----------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    (0, "`n` must be an integer >= 1; received `0`."),
    (True, "`n` must be an integer >= 1; received `True` (bool)."),
    (2.0, "`n` must be an integer >= 1; received `2.0` (float)."),
])
def test_one_integer_check(value, message):
    with pytest.raises(ConfigError) as err:
        check_int("n", value, low=1)
    assert str(err.value) == message
    assert check_int("n", 5, low=1, high=5) == 5
    with pytest.raises(ConfigError, match=r"`n` must be an integer >= 1 and at most 4 \(why\); received `9`"):
        check_int("n", 9, low=1, high=4, why_high="why")


@pytest.mark.parametrize("values", [(0,), (1, 2.5), (True,), "4", ()])
def test_bench_sweeps_use_the_integer_check(values):
    from featx_edge.bench.plan import positive_ints

    with pytest.raises(ConfigError, match=r"`threads` must be one or more positive integers"):
        positive_ints("threads", values)
    assert positive_ints("threads", (4, 1, 4)) == (1, 4) and positive_ints("threads", 2) == (2,)
