"""The fast tier's guard (tests/conftest.py): an unmarked test over its CPU limit fails; a slow one does not."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

PROBE = '''
import time

import pytest

import conftest


def _burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.fixture(autouse=True)
def _low_limit(monkeypatch):  # the real limit (10 CPU seconds) would make this test slow
    monkeypatch.setattr(conftest, "UNMARKED_CALL_LIMIT_S", 0.3)


def test_unmarked_and_costly():
    _burn(0.6)


@pytest.mark.slow
def test_marked_and_costly():
    _burn(0.6)


def test_unmarked_and_cheap():
    _burn(0.05)
'''


def test_an_unmarked_test_over_the_cpu_limit_fails_and_says_how_to_fix_it(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_probe=PROBE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    expected = ("*test_unmarked_and_costly: its call cost 0.* CPU seconds*over the 0.3 CPU seconds an unmarked test "
                "may take*mark it @pytest.mark.slow*")
    result.stdout.fnmatch_lines([expected])
