"""Quiet by default: what other libraries print is held back, and shown when their step fails."""

from __future__ import annotations

import os

import pytest

from featx_edge import progress


@pytest.fixture(autouse=True)
def _reset():
    yield
    progress.configure(quiet=False, verbose=False)


def test_native_output_is_held_back_unless_the_step_fails(capfd):
    progress.configure(quiet=False, verbose=False)
    with progress.native_output("a chatty library"):
        os.write(2, b"E0000 failed call to cuInit\n")
        os.write(1, b"fully_quantize: 0, inference_type: 6\n")
    assert capfd.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="converter crashed"), progress.native_output("the converter"):
        os.write(2, b"the real reason: op FOO is not supported\n")
        raise RuntimeError("converter crashed")
    err = capfd.readouterr().err
    assert "output of the converter (it failed)" in err and "op FOO is not supported" in err


def test_verbose_lets_everything_through(capfd):
    progress.configure(quiet=False, verbose=True)
    with progress.native_output("a chatty library"):
        os.write(2, b"native log line\n")
    assert "native log line" in capfd.readouterr().err


def test_messages_go_to_stdout_and_warnings_to_stderr(capsys):
    import logging

    progress.configure(quiet=False)
    logging.getLogger("featx_edge.test").info("stage 1 done")
    logging.getLogger("featx_edge.test").warning("calibration fell back to minmax")
    out, err = capsys.readouterr()
    assert out == "stage 1 done\n" and err == "warning: calibration fell back to minmax\n"
    progress.configure(quiet=True)
    logging.getLogger("featx_edge.test").info("hidden")
    assert capsys.readouterr().out == ""
