"""The restricted unpickler behind ``torch_checkpoint``: torch's pickles of state dicts, read
into lazy tensor descriptions without importing torch or running any code a file names.

Only the globals a state dict of dense tensors needs are resolved (``_ALLOWED_GLOBALS``); any
other reference is refused with a ``CheckpointFormatError`` that says what the file holds.
Storages are described here and materialised by the format readers in ``torch_checkpoint``.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from typing import IO, Any

import ml_dtypes
import numpy as np

from kfor1.errors import UserError

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
for _name in (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
):
    if hasattr(ml_dtypes, _name):
        _TORCH_DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": _TORCH_DTYPES["float64"],
    "FloatStorage": _TORCH_DTYPES["float32"],
    "HalfStorage": _TORCH_DTYPES["float16"],
    "BFloat16Storage": _TORCH_DTYPES["bfloat16"],
    "LongStorage": _TORCH_DTYPES["int64"],
    "IntStorage": _TORCH_DTYPES["int32"],
    "ShortStorage": _TORCH_DTYPES["int16"],
    "CharStorage": _TORCH_DTYPES["int8"],
    "ByteStorage": _TORCH_DTYPES["uint8"],
    "BoolStorage": _TORCH_DTYPES["bool"],
    "ComplexFloatStorage": _TORCH_DTYPES["complex64"],
    "ComplexDoubleStorage": _TORCH_DTYPES["complex128"],
    # Raw bytes; tensors on it carry their own dtype (_rebuild_tensor_v3).
    "UntypedStorage": _TORCH_DTYPES["uint8"],
}


class CheckpointFormatError(UserError, ValueError):
    """The file is not a PyTorch weights file that can be read safely into arrays."""


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.*Storage`` class referenced by the pickle."""

    name: str
    dtype: np.dtype


class Storage:
    """A storage named by the pickle; its bytes are attached after unpickling."""

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None  # uint8, filled in by the format reader


@dataclass(frozen=True)
class StorageView:
    """A slice of a root storage (legacy format ``view_metadata``), in root elements."""

    root: Storage
    offset: int
    numel: int


@dataclass
class LazyTensor:
    """A tensor whose storage bytes may not have been read yet (legacy files put them last)."""

    storage: Storage | StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype
    neg: bool = False
    conj: bool = False


class _TensorClass:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise TypeError(f"bad tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> LazyTensor:
    if not isinstance(storage, Storage | StorageView):
        raise TypeError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TypeError(f"bad storage offset {storage_offset!r}")
    size_t = _as_int_tuple(size, "size")
    stride_t = _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise TypeError(f"size {size_t} and stride {stride_t} differ in length")
    root = storage.root if isinstance(storage, StorageView) else storage
    return LazyTensor(storage, storage_offset, size_t, stride_t, dtype or root.dtype)


def _apply_metadata(tensor: LazyTensor, metadata: Any) -> LazyTensor:
    # torch records lazily negated/conjugated views as bits instead of rewriting the data.
    if isinstance(metadata, dict):
        tensor.neg = bool(metadata.get("neg", False))
        tensor.conj = bool(metadata.get("conj", False))
    return tensor


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> LazyTensor:
    return _apply_metadata(_rebuild_tensor(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> LazyTensor:
    # Used for dtypes without a legacy storage class (uint16, float8, ...): untyped storage.
    if not isinstance(dtype, np.dtype):
        raise TypeError(f"bad tensor dtype {dtype!r}")
    tensor = _rebuild_tensor(storage, storage_offset, size, stride, dtype)
    return _apply_metadata(tensor, metadata)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> LazyTensor:
    if not isinstance(data, LazyTensor):
        raise TypeError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensors carrying Python attributes; the attributes (state) are irrelevant to weights.
    if new_type is not _TensorClass or func not in _REBUILD_FUNCTIONS:
        raise TypeError("unsupported tensor subclass")
    return func(*args)


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell a ``bytes`` object as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise TypeError("unsupported _codecs.encode call")
    return text.encode(encoding)


_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
}
for _name, _dtype in _STORAGE_DTYPES.items():
    _module = "torch.storage" if _name == "UntypedStorage" else "torch"
    _ALLOWED_GLOBALS[(_module, _name)] = StorageType(_name, _dtype)
    # Legacy files saved from a GPU model name the CUDA storage classes.
    _ALLOWED_GLOBALS[("torch.cuda", _name)] = StorageType(_name, _dtype)
_ALLOWED_GLOBALS[("torch", "UntypedStorage")] = StorageType("UntypedStorage", np.dtype(np.uint8))
for _name, _dtype in _TORCH_DTYPES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _dtype

# Python 2 module names that protocol-2 pickles may use (pickle only maps them itself when
# find_class is not overridden).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def not_torch_message(path: str) -> str:
    return (
        f"{path} is not a PyTorch weights file (neither the zip nor the legacy pickle format); "
        "pass a file written by torch.save(model.state_dict())"
    )


def corrupt(path: str, detail: object) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path} is truncated or corrupt ({detail}); re-download it or re-export it with "
        "torch.save(model.state_dict(), path)"
    )


def _refusal(path: str, module: str, name: str) -> CheckpointFormatError:
    qualname = f"{module}.{name}"
    if module in ("posix", "nt"):
        qualname += f" (os.{name})"
    if module == "torch" or module.startswith("torch."):
        return CheckpointFormatError(
            f"cannot read {path}: it uses {qualname}, which this reader does not support "
            "(whole pickled models, quantized, sparse or other non-dense tensors); load it "
            "with torch and re-save it with torch.save(model.state_dict(), path)"
        )
    return CheckpointFormatError(
        f"refusing to load {path}: it references {qualname}, which a weights file never "
        "needs; only state dicts of tensors are supported"
    )


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage references."""

    def __init__(
        self, file: IO[bytes], path: str, storages: dict[str, Storage] | None = None
    ) -> None:
        super().__init__(file)
        self._path = path
        self._storages = storages

    def load(self) -> Any:
        try:
            return super().load()
        except MemoryError:
            # A corrupt length field makes pickle try to allocate absurd amounts.
            raise pickle.UnpicklingError("implausibly large object") from None

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _refusal(self._path, module, name) from None

    def persistent_load(self, pid: Any) -> Storage | StorageView:
        if self._storages is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        kind, storage_type, key, _location, numel, *view = pid
        if isinstance(kind, bytes):
            kind = kind.decode("ascii")
        if kind != "storage" or not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference {pid!r:.80}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = Storage(key, storage_type.dtype, numel)
        view_metadata = view[0] if view else None
        if view_metadata is None:
            return storage
        _view_key, offset, view_numel = view_metadata
        if (
            not (isinstance(offset, int) and isinstance(view_numel, int))
            or min(offset, view_numel) < 0
        ):
            raise pickle.UnpicklingError(f"bad storage view {view_metadata!r:.80}")
        return StorageView(storage, offset, view_numel)
