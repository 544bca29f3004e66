"""The records a ``.pth`` pickle makes, checked and made into arrays within a memory budget.

Internal to :mod:`featx_edge.backbones.torch_state`. The records are immutable and refuse a pickle BUILD,
so what the reader checks once the whole pickle is read is what the pickle made; every tensor is
then checked against the bytes of its storage and materialized once, each allocation charged to
a :class:`Budget` first.
"""

from __future__ import annotations

import collections
import math
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np

# The largest checkpoint featx-edge reads is efficientnet-lite2's (24.7 MB, nearly all tensor
# data). About 4x that bounds what one file may make the reader hold at once.
MAX_STATE_BYTES = 100 * 2**20
# ... and so does this many times the file's own size: a real state dict's tensors are its bytes
# (1x), up to twice for tied weights, 3x for bfloat16 widened to float32; 8x leaves room.
MAX_EXPANSION = 8

_MAX_DIMS = 64  # NumPy's limit


class Malformed(Exception):
    """Raised inside the reader; turned into a WeightsError that names the file."""


class TooLarge(Exception):
    """The file asks for more memory than its size or the state dict limit allows."""


def _refuse_rewrite(self: Any, state: Any) -> None:
    """``__setstate__`` of every record: the pickle's BUILD opcode may not change one after it was made."""
    raise Malformed(f"its pickle rewrites a {type(self).__name__.lstrip('_')} record after it was made (BUILD), "
                    "which torch.save never writes")


# The records below are what the pickle can hold. They are frozen and slotted (no __dict__ to
# update) and their __setstate__ refuses, so a later opcode cannot change what was made.


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only a name, never callable."""

    name: str
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class Storage:
    """A storage named by the pickle; its bytes are read into the reader's own table, by key."""

    key: str
    type_name: str
    numel: int
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class StorageView:
    """A legacy storage view (``view_metadata``): ``size`` elements of ``root`` from ``offset``."""

    root: Storage
    offset: int
    size: int
    __setstate__ = _refuse_rewrite


@dataclass(frozen=True, slots=True)
class TensorRef:
    """The arguments ``_rebuild_tensor_v2`` received, unchecked: they are checked once the pickle is read."""

    storage: Any
    offset: Any
    size: Any
    stride: Any
    __setstate__ = _refuse_rewrite


def rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad, hooks and metadata are ignored."""
    return TensorRef(storage=storage, offset=storage_offset, size=size, stride=stride)


class Budget:
    """What the reader may still allocate for one file: charged before each allocation, credited when dropped."""

    def __init__(self, *, file_size: int) -> None:
        self.limit = min(MAX_STATE_BYTES, MAX_EXPANSION * file_size)
        self.left = self.limit

    def charge(self, nbytes: int, *, what: str) -> None:
        if nbytes > self.left:
            raise TooLarge(
                f"{what} needs {nbytes:,} bytes, past the limit for this file ({self.limit:,} bytes held at "
                f"once: {MAX_EXPANSION}x its size, and at most {MAX_STATE_BYTES // 2**20} MiB, about 4x the "
                "largest EfficientNet-Lite checkpoint)")
        self.left -= nbytes

    def release(self, nbytes: int) -> None:
        """``nbytes`` charged earlier are no longer held (a storage dropped once its tensors are copied)."""
        self.left = min(self.limit, self.left + nbytes)


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool, which pickles as its own opcode)."""
    return type(value) is int and value >= 0


def short(value: Any) -> str:
    """A bounded, one-line repr of a value taken from the file."""
    return reprlib.repr(value)


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A tensor record whose fields have the right types; its extent is checked when its storage is read."""

    name: str
    key: str  # the root storage's
    view: StorageView | None  # the legacy storage view it lies in, if any
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Plan:
    """The state dict's tensors, materialized storage by storage as each storage is read.

    Made from the whole unpickled object, so no record is looked at before the pickle ends.
    Each storage's buffer is released once its tensors are made (or handed to its one tensor),
    so the reader holds the finished tensors plus one storage.
    """

    def __init__(self, obj: Any, *, budget: Budget) -> None:
        # Read through the type, not the object: a BUILD on the dict may set attributes such as `items`.
        if type(obj) not in (dict, collections.OrderedDict):
            raise Malformed(f"it holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
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
                raise Malformed(f"storage {short(tensor.key)} is used by tensor {short(tensor.name)} "
                                "but its data is missing")
        return {t.name: self._arrays[t.name] for t in self._tensors}


def _check_record(name: Any, ref: Any) -> _Tensor:
    """One state dict entry: a named tensor record with a storage and non-negative integer geometry."""
    if type(name) is not str or type(ref) is not TensorRef:
        raise Malformed(f"entry {short(name)} is a {type(ref).__name__}, not a tensor "
                        "(only plain state dicts, name -> tensor, are read)")
    storage, offset, size, stride = ref.storage, ref.offset, ref.size, ref.stride
    if not (type(storage) in (Storage, StorageView) and is_count(offset) and _counts(size)
            and _counts(stride) and len(size) == len(stride) <= _MAX_DIMS):
        raise Malformed(f"tensor {short(name)} is described with unexpected arguments (storage a "
                        f"{type(storage).__name__.strip('_')}, offset {short(offset)}, size {short(size)}, "
                        f"stride {short(stride)}; a storage and non-negative integers expected)")
    view = storage if type(storage) is StorageView else None
    root = storage.root if view is not None else storage
    return _Tensor(name=name, key=root.key, view=view, offset=offset, size=size, stride=stride)


def _counts(value: Any) -> bool:
    return type(value) is tuple and all(is_count(v) for v in value)


def _check_extent(tensor: _Tensor, data: np.ndarray) -> None:
    """Every element of the tensor lies inside ``data``, and it has no more elements than ``data``."""
    numel = math.prod(tensor.size)
    if not numel:
        return
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if last >= data.size:
        raise Malformed(f"tensor {short(tensor.name)} lies outside its storage (it reaches element "
                        f"{last:,} of {data.size:,})")
    if numel > data.size:
        raise Malformed(f"tensor {short(tensor.name)} has more elements than its storage ({numel:,} > "
                        f"{data.size:,}): repeated (stride-0) elements, which a model's state dict does not hold")


def _window(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
    """The elements the tensor may use: the whole storage, or its legacy storage view."""
    view = tensor.view
    return storage if view is None else storage[view.offset: view.offset + view.size]


def _contiguous(tensor: _Tensor) -> bool:
    """Row-major: each stride is the product of the sizes after it (dimensions of size 1 excepted)."""
    step = 1
    for n, s in zip(reversed(tensor.size), reversed(tensor.stride), strict=True):
        if n != 1 and s != step:
            return False
        step *= n
    return True


def _is_whole(tensor: _Tensor, storage: np.ndarray) -> bool:
    """The tensor is its whole storage, in order: the storage's buffer, reshaped, is the tensor."""
    return (tensor.view is None and tensor.offset == 0 and math.prod(tensor.size) == storage.size
            and _contiguous(tensor))


def _copy(tensor: _Tensor, data: np.ndarray, *, budget: Budget) -> np.ndarray:
    """The tensor copied once out of ``data`` (its extent already checked) into a C-contiguous array."""
    size, offset = tensor.size, tensor.offset
    numel = math.prod(size)
    budget.charge(numel * data.itemsize, what=f"tensor {short(tensor.name)}")
    if numel == 0:
        return np.zeros(size, dtype=data.dtype)
    if _contiguous(tensor):
        return data[offset: offset + numel].reshape(size).copy()
    # Safe: _check_extent bounded every element (offset + sum((n - 1) * stride)) by ``data``.
    strided = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * data.itemsize for s in tensor.stride), writeable=False
    )
    return np.array(strided, order="C")

