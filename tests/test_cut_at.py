"""`--cut-at LAYER` (config `model.cut_at`): the classifier on an earlier layer's pooled features.

The cut flows through the feature cache key, the classifier, the manifest, export and verify (the
reference is the cut model). Random backbone weights (`--weights none`) are enough here: these
tests check shapes, records and plumbing, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, make_class_folder, one_line_error

from featx_edge.cli import main
from featx_edge.config import ModelConfig, config_from_dict
from featx_edge.errors import ConfigError

CUT = "block_6_project_BN"  # MobileNetV2 0.35: 64 px -> 4x4x24 features


def _train(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    data = make_class_folder(tmp_path / "data", {"a": 6, "b": 6}, size=24)
    run = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), *TINY, "--weights", "none", "--epochs", "1",
               "--feature-cache", str(tmp_path / "cache"), "--quiet", *extra])
    return rc, run


@pytest.mark.slow  # trains a run (a minute on 2 busy cores)
def test_cut_at_builds_a_smaller_model_with_the_cut_layers_features_and_records_it(tmp_path):
    from featx_edge.training.model import build_classifier
    from featx_edge.training.run import Run

    rc, run = _train(tmp_path, "--cut-at", CUT)
    assert rc == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backbone"]["cut_at"] == CUT and manifest["config"]["model"]["cut_at"] == CUT
    assert manifest["training"]["feature_cache"]["key"]["cut_at"] == CUT
    assert CUT in Path(manifest["training"]["feature_cache"]["dir"]).name  # its own cache entry

    reference = Run.open(run).reference()  # rebuilt from the recorded config: the cut model
    assert reference.feature_model.output_shape == (None, 24) == (None, manifest["backbone"]["feature_dim"])
    full = build_classifier(num_classes=2, weights_file=None,
                            config=ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=64, weights="none"))
    assert reference.model.count_params() < full.model.count_params() / 10
    names = {layer.name for layer in reference.model.layers}
    assert CUT in names and "out_relu" not in names  # nothing after the cut is in the graph
    assert {layer.name for layer in reference.backbone_layers} <= names  # stage 2 unfreezes only what is there


@pytest.mark.slow  # trains, exports and verifies a run
def test_export_and_verify_use_the_cut_model_as_the_reference(tmp_path, capsys):
    rc, run = _train(tmp_path, "--cut-at", CUT)
    assert rc == 0
    assert main(["export", str(run), "--formats", "tflite-float32", "--quiet"]) == 0
    assert main(["verify", str(run), "--quiet"]) == 0
    report = json.loads((run / "verify.json").read_text())
    assert report["formats"]["tflite-float32"]["passed"], report["formats"]["tflite-float32"]


def test_a_layer_that_is_not_in_the_backbone_is_refused_in_one_line_naming_stage_outputs(tmp_path, capsys):
    rc, run = _train(tmp_path, "--cut-at", "block_99_add")
    assert rc == 2
    one_line_error(capsys, "`--cut-at`", "`block_99_add`", "mobilenet_v2", "block_5_add", "out_relu")
    assert not run.exists()  # refused before any folder was made


def test_the_config_key_is_read_and_checked():
    config = config_from_dict({"model": {"backbone": "mobilenet_v2", "alpha": 0.35, "cut_at": CUT}})
    assert config.model.cut_at == CUT and config.to_dict()["model"]["cut_at"] == CUT
    with pytest.raises(ConfigError, match="cut_at"):
        config_from_dict({"model": {"cut_at": 3}}, source="x.toml")


def test_the_whole_backbone_keeps_the_feature_cache_key_it_had_before_cuts():
    """Existing caches stay valid: without a cut, the digest is the one computed without the new field."""
    import hashlib
    from dataclasses import asdict

    from featx_edge.backbones.registry import get_backbone
    from featx_edge.training.features import feature_key

    key = feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256="1" * 64, seed=0, size=64)
    before = {k: v for k, v in asdict(key).items() if k != "cut_at"}
    old = f"mobilenet_v2-64-{hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:20]}"
    assert key.digest() == old
    cut = feature_key(get_backbone("mobilenet_v2"), alpha=0.35, weights_sha256="1" * 64, seed=0, size=64, cut_at=CUT)
    assert cut.digest() != old and CUT in cut.digest()
