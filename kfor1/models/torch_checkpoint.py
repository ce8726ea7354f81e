"""Read PyTorch weight files (``.pt``/``.pth``) into numpy arrays without importing torch.

Why not ``torch.load``: torch is only an optional extra of kfor1, and ``torch.load`` on a
downloaded file can run arbitrary code. This module parses the two on-disk formats that
``torch.save`` writes and unpickles them with an allow-list that admits only what a state dict
of tensors needs, so a malicious file is refused instead of executed.

Formats (both written by ``torch.save``):

* zip (default since torch 1.6): ``<prefix>/data.pkl`` is the pickled object; each storage's
  raw bytes live in ``<prefix>/data/<key>``; ``<prefix>/byteorder`` names their byte order.
* legacy (``_use_new_zipfile_serialization=False``): a sequence of pickles -- magic number,
  protocol version, sys_info, the object, the list of storage keys -- followed, for each key
  in that order, by an int64 little-endian element count and the raw little-endian elements.
  The element size is that of the storage's dtype; ``sys_info["type_sizes"]`` is ignored,
  exactly as torch ignores it (files written on Windows say ``long: 4`` yet store int64).
"""

from __future__ import annotations

import collections
import errno
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointFormatError", "read_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# The magic number pickled with protocol 0 or 1 (LONG opcode); protocols >= 2 start with 0x80.
_LEGACY_TEXT_MAGIC = b"L" + str(_LEGACY_MAGIC).encode()
# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_DATA_PARALLEL_PREFIX = "module."

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


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch weights file that can be read safely into arrays."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class referenced by the pickle."""

    name: str
    dtype: np.dtype


class _Storage:
    """A storage named by the pickle; its bytes are attached after unpickling."""

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None  # uint8, filled in by the format reader


@dataclass(frozen=True)
class _StorageView:
    """A slice of a root storage (legacy format ``view_metadata``), in root elements."""

    root: _Storage
    offset: int
    numel: int


@dataclass
class _LazyTensor:
    """A tensor whose storage bytes may not have been read yet (legacy files put them last)."""

    storage: _Storage | _StorageView
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
) -> _LazyTensor:
    if not isinstance(storage, _Storage | _StorageView):
        raise TypeError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TypeError(f"bad storage offset {storage_offset!r}")
    size_t = _as_int_tuple(size, "size")
    stride_t = _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise TypeError(f"size {size_t} and stride {stride_t} differ in length")
    root = storage.root if isinstance(storage, _StorageView) else storage
    return _LazyTensor(storage, storage_offset, size_t, stride_t, dtype or root.dtype)


def _apply_metadata(tensor: _LazyTensor, metadata: Any) -> _LazyTensor:
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
) -> _LazyTensor:
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
) -> _LazyTensor:
    # Used for dtypes without a legacy storage class (uint16, float8, ...): untyped storage.
    if not isinstance(dtype, np.dtype):
        raise TypeError(f"bad tensor dtype {dtype!r}")
    tensor = _rebuild_tensor(storage, storage_offset, size, stride, dtype)
    return _apply_metadata(tensor, metadata)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> _LazyTensor:
    if not isinstance(data, _LazyTensor):
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
    _ALLOWED_GLOBALS[(_module, _name)] = _StorageType(_name, _dtype)
    # Legacy files saved from a GPU model name the CUDA storage classes.
    _ALLOWED_GLOBALS[("torch.cuda", _name)] = _StorageType(_name, _dtype)
_ALLOWED_GLOBALS[("torch", "UntypedStorage")] = _StorageType("UntypedStorage", np.dtype(np.uint8))
for _name, _dtype in _TORCH_DTYPES.items():
    _ALLOWED_GLOBALS[("torch", _name)] = _dtype

# Python 2 module names that protocol-2 pickles may use (pickle only maps them itself when
# find_class is not overridden).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _not_torch_message(path: str) -> str:
    return (
        f"{path} is not a PyTorch weights file (neither the zip nor the legacy pickle format); "
        "pass a file written by torch.save(model.state_dict())"
    )


def _corrupt(path: str, detail: object) -> CheckpointFormatError:
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


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage references."""

    def __init__(
        self, file: IO[bytes], path: str, storages: dict[str, _Storage] | None = None
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

    def persistent_load(self, pid: Any) -> _Storage | _StorageView:
        if self._storages is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        kind, storage_type, key, _location, numel, *view = pid
        if isinstance(kind, bytes):
            kind = kind.decode("ascii")
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference {pid!r:.80}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, storage_type.dtype, numel)
        view_metadata = view[0] if view else None
        if view_metadata is None:
            return storage
        _view_key, offset, view_numel = view_metadata
        if (
            not (isinstance(offset, int) and isinstance(view_numel, int))
            or min(offset, view_numel) < 0
        ):
            raise pickle.UnpicklingError(f"bad storage view {view_metadata!r:.80}")
        return _StorageView(storage, offset, view_numel)


def _describe(obj: Any) -> str:
    if isinstance(obj, _LazyTensor):
        return "a single tensor"
    if isinstance(obj, _Storage | _StorageView | _StorageType):
        return "a bare storage"
    return f"a {type(obj).__name__}"


def _select_state_dict(obj: Any, path: str) -> dict[str, _LazyTensor]:
    """Finds the name -> tensor mapping, unwrapping ``{"state_dict": ...}``-style checkpoints."""
    while True:
        if not isinstance(obj, dict):
            raise CheckpointFormatError(
                f"{path} holds {_describe(obj)}, not a state dict (a dict of named "
                "tensors); save one with torch.save(model.state_dict(), path)"
            )
        if any(isinstance(v, _LazyTensor) for v in obj.values()):
            break
        wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(wrappers) != 1:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise CheckpointFormatError(
                f"{path} contains no tensors at the top level (keys: {keys or 'none'}) and no "
                f"single nested state dict under one of {', '.join(_WRAPPER_KEYS)}"
            )
        obj = obj[wrappers[0]]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _LazyTensor)}
    if tensors and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in tensors):
        # Saved from a DataParallel/DistributedDataParallel wrapper.
        tensors = {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def _roots(tensors: dict[str, _LazyTensor]) -> dict[str, _Storage]:
    roots = {}
    for t in tensors.values():
        root = t.storage.root if isinstance(t.storage, _StorageView) else t.storage
        roots[root.key] = root
    return roots


def _materialize(tensor: _LazyTensor, little_endian: bool) -> np.ndarray:
    """Copies a tensor out of its storage bytes into a C-contiguous array."""
    storage = tensor.storage
    if isinstance(storage, _StorageView):
        root = storage.root
        assert root.data is not None
        start = storage.offset * root.dtype.itemsize
        raw = root.data[start : start + storage.numel * root.dtype.itemsize]
    else:
        assert storage.data is not None
        raw = storage.data
    dtype = tensor.dtype
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype)
    itemsize = dtype.itemsize
    raw = raw[: raw.size - raw.size % itemsize]
    if little_endian != (sys.byteorder == "little") and itemsize > 1:
        unit = itemsize // 2 if dtype.kind == "c" else itemsize
        flat = raw.view(f"u{unit}").byteswap().view(dtype)
    else:
        flat = raw.view(dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise ValueError(
            f"a tensor needs element {last} of a storage holding only {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * itemsize for s in tensor.stride),
        writeable=False,
    )
    out = np.array(view, dtype=dtype, order="C", copy=True)
    if tensor.conj:
        out = np.conj(out)
    if tensor.neg:
        out = np.negative(out)
    return out


def _read_zip(f: IO[bytes], path: str) -> tuple[dict[str, _LazyTensor], bool]:
    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if not pickles:
            raise CheckpointFormatError(_not_torch_message(path))
        prefix = pickles[0][: -len("/data.pkl")]
        if f"{prefix}/constants.pkl" in names or any(
            n.startswith(f"{prefix}/code/") for n in names
        ):
            raise CheckpointFormatError(
                f"{path} is a TorchScript archive (torch.jit.save), not a state dict; export "
                "one with torch.save(torch.jit.load(path).state_dict(), new_path)"
            )
        little_endian = True
        if f"{prefix}/byteorder" in names:
            little_endian = zf.read(f"{prefix}/byteorder").strip() != b"big"
        storages: dict[str, _Storage] = {}
        with zf.open(f"{prefix}/data.pkl") as pkl:
            obj = _RestrictedUnpickler(pkl, path, storages).load()
        tensors = _select_state_dict(obj, path)
        for key, storage in _roots(tensors).items():
            storage.data = np.frombuffer(zf.read(f"{prefix}/data/{key}"), dtype=np.uint8)
    return tensors, little_endian


def _read_legacy(f: IO[bytes], path: str) -> tuple[dict[str, _LazyTensor], bool]:
    magic = _RestrictedUnpickler(f, path).load()
    if not isinstance(magic, int) or isinstance(magic, bool) or magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(_not_torch_message(path))
    version = _RestrictedUnpickler(f, path).load()
    if version != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(
            f"{path} uses legacy serialization protocol {version!r}, which is not supported"
        )
    _RestrictedUnpickler(f, path).load()  # sys_info; its type_sizes are not used (see above)
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(f, path, storages).load()
    keys = _RestrictedUnpickler(f, path).load()
    if not isinstance(keys, list):
        raise TypeError("storage key list missing")
    tensors = _select_state_dict(obj, path)
    needed = _roots(tensors)
    file_size = os.fstat(f.fileno()).st_size
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise ValueError(f"storage {key!r} is not referenced by the pickle")
        header = f.read(8)
        if len(header) != 8:
            raise EOFError("file ends inside the storage data")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * storage.dtype.itemsize
        if numel < 0 or f.tell() + nbytes > file_size:
            raise EOFError("file ends inside the storage data")
        if key in needed:
            storage.data = np.frombuffer(f.read(nbytes), dtype=np.uint8)
        else:
            f.seek(nbytes, os.SEEK_CUR)
    missing = [k for k in needed if needed[k].data is None]
    if missing:
        raise ValueError(f"no data for storage {missing[0]!r}")
    return tensors, True


# Errors that malformed input can provoke inside pickle, zipfile, struct or the rebuild helpers.
_CORRUPTION_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # zipfile: unknown compression method
    RuntimeError,  # zipfile: entry claims to be encrypted
    zlib.error,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def read_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a PyTorch weights file into numpy arrays WITHOUT importing torch.

    Accepts files written by ``torch.save`` in the zip or the legacy format, holding a state
    dict or a checkpoint dict with one of ``state_dict``/``model``/``model_state_dict``/``net``.
    Non-tensor entries are dropped and a DataParallel ``module.`` prefix is removed. Tensors
    come back as C-contiguous arrays of the matching dtype (bfloat16 as ``ml_dtypes``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointFormatError: the file is not such a weights file, is truncated or corrupt,
            or references code (any pickle global outside the allow-list).
    """
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise FileNotFoundError(
            errno.ENOENT, f"PyTorch weights file not found: {path_str}", path_str
        )
    if os.path.isdir(path_str):
        raise CheckpointFormatError(f"{path_str} is a directory, not a PyTorch weights file")
    with open(path_str, "rb") as f:
        head = f.read(512)
        f.seek(0)
        if not head:
            raise _corrupt(path_str, "the file is empty")
        try:
            if head.startswith(b"PK"):
                tensors, little_endian = _read_zip(f, path_str)
            elif head[:1] == b"\x80" or head.startswith(_LEGACY_TEXT_MAGIC):
                tensors, little_endian = _read_legacy(f, path_str)
            elif len(head) == 512 and head[257:262] == b"ustar":
                raise CheckpointFormatError(
                    f"{path_str} is a tar archive; PyTorch older than 0.4 wrote weights that "
                    "way, which is not supported: load it with torch and re-save it with "
                    "torch.save(model.state_dict(), path)"
                )
            else:
                raise CheckpointFormatError(_not_torch_message(path_str))
            return {k: _materialize(t, little_endian) for k, t in tensors.items()}
        except CheckpointFormatError:
            raise
        except _CORRUPTION_ERRORS as exc:
            raise _corrupt(path_str, exc) from exc
