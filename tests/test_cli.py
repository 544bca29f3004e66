"""The command line: listings, errors that say what to do, and the sample data."""

import subprocess
import sys

import numpy as np
import pytest

from featx_edge.cli import main


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet50", "vgg16"):
        assert name in out


def test_python_dash_m_runs_the_cli():  # the installed `featx-edge` script: tests/test_console_script.py
    out = subprocess.run([sys.executable, "-m", "featx_edge", "--version"], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("featx-edge ")


def test_bad_backbone_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--backbone", "mobilenet2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "`--backbone` must be one of mobilenet_v2" in err and "received `mobilenet2`" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_data_folder_fails_before_training(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
               "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_mixed_precision_without_gpu_is_explained(tmp_path, capsys):
    from conftest import make_class_folder

    root = make_class_folder(tmp_path / "data", {"a": 4, "b": 4})
    rc = main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--backbone", "mobilenet_v2", "--alpha", "0.35",
               "--image-size", "32", "--weights", "none", "--mixed-precision"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a GPU" in err
    assert "warning: `--weights none`: the frozen backbone keeps random weights" in err


def test_sample_data_writes_real_digits(tmp_path, capsys):
    from PIL import Image

    assert main(["sample-data", str(tmp_path / "digits")]) == 0
    source = sorted(p.name for p in (tmp_path / "digits" / "source").iterdir())
    target = sorted(p.name for p in (tmp_path / "digits" / "target").iterdir())
    assert source == [f"digit_{d}" for d in range(5)] and target == [f"digit_{d}" for d in range(5, 10)]
    every = sorted(p.name for p in (tmp_path / "digits" / "all").iterdir())
    assert every == [f"digit_{d}" for d in range(10)]
    files = list((tmp_path / "digits" / "all").rglob("*.png"))
    assert len(files) == 1797  # every scan scikit-learn ships
    parts = list((tmp_path / "digits" / "source").rglob("*.png")) + list((tmp_path / "digits" / "target").rglob("*.png"))
    assert len(parts) == 1797
    with Image.open(files[0]) as img:
        assert img.size == (32, 32) and img.mode == "L"
        pixels = np.asarray(img)
    assert np.median(pixels) > 200 and pixels.min() < 100  # dark ink on white paper, as scanned
    # Re-running on a complete copy is a no-op; a non-empty foreign folder is refused.
    assert main(["sample-data", str(tmp_path / "digits")]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    assert main(["sample-data", str(tmp_path / "other")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_every_command_says_what_it_does_with_an_example(capsys):
    from featx_edge.cli import COMMANDS, build_parser

    parser = build_parser()
    assert "Start with: featx-edge run" in parser.format_help()
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert f"example: featx-edge {name}" in text, name
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--fine-tune-epochs" not in capsys.readouterr().out  # pretraining has no stage 2


def test_every_option_is_helped_and_config_options_show_their_default():
    import argparse

    from featx_edge.cli import build_parser

    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"`featx-edge {name}` {action.option_strings or action.dest} has no help"
    helped = {a.dest: a.help for a in subs["train"]._actions}
    assert "(default: 32)" in helped["batch_size"] and "(default: 10)" in helped["epochs"]
    assert "(default: 0)" in helped["seed"]
