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

import errno
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from typing import IO, Any

import numpy as np

from kfor1.models.torch_pickle import (
    CheckpointFormatError,
    LazyTensor,
    RestrictedUnpickler,
    Storage,
    StorageType,
    StorageView,
    corrupt,
    not_torch_message,
)
from kfor1.untrusted import MAX_WEIGHTS_BYTES, regular_file

__all__ = ["CheckpointFormatError", "read_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# The magic number pickled with protocol 0 or 1 (LONG opcode); protocols >= 2 start with 0x80.
_LEGACY_TEXT_MAGIC = b"L" + str(_LEGACY_MAGIC).encode()
# Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_DATA_PARALLEL_PREFIX = "module."


def _describe(obj: Any) -> str:
    if isinstance(obj, LazyTensor):
        return "a single tensor"
    if isinstance(obj, Storage | StorageView | StorageType):
        return "a bare storage"
    return f"a {type(obj).__name__}"


def _select_state_dict(obj: Any, path: str) -> dict[str, LazyTensor]:
    """Finds the name -> tensor mapping, unwrapping ``{"state_dict": ...}``-style checkpoints."""
    while True:
        if not isinstance(obj, dict):
            raise CheckpointFormatError(
                f"{path} holds {_describe(obj)}, not a state dict (a dict of named "
                "tensors); save one with torch.save(model.state_dict(), path)"
            )
        if any(isinstance(v, LazyTensor) for v in obj.values()):
            break
        wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        if len(wrappers) != 1:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise CheckpointFormatError(
                f"{path} contains no tensors at the top level (keys: {keys or 'none'}) and no "
                f"single nested state dict under one of {', '.join(_WRAPPER_KEYS)}"
            )
        obj = obj[wrappers[0]]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, LazyTensor)}
    if tensors and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in tensors):
        # Saved from a DataParallel/DistributedDataParallel wrapper.
        tensors = {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def _roots(tensors: dict[str, LazyTensor]) -> dict[str, Storage]:
    roots = {}
    for t in tensors.values():
        root = t.storage.root if isinstance(t.storage, StorageView) else t.storage
        roots[root.key] = root
    return roots


def _materialize(tensor: LazyTensor, little_endian: bool) -> np.ndarray:
    """Copies a tensor out of its storage bytes into a C-contiguous array."""
    storage = tensor.storage
    if isinstance(storage, StorageView):
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


def _read_zip(f: IO[bytes], path: str) -> tuple[dict[str, LazyTensor], bool]:
    with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if not pickles:
            raise CheckpointFormatError(not_torch_message(path))
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
        storages: dict[str, Storage] = {}
        with zf.open(f"{prefix}/data.pkl") as pkl:
            obj = RestrictedUnpickler(pkl, path, storages).load()
        tensors = _select_state_dict(obj, path)
        for key, storage in _roots(tensors).items():
            storage.data = np.frombuffer(zf.read(f"{prefix}/data/{key}"), dtype=np.uint8)
    return tensors, little_endian


def _read_legacy(f: IO[bytes], path: str) -> tuple[dict[str, LazyTensor], bool]:
    magic = RestrictedUnpickler(f, path).load()
    if not isinstance(magic, int) or isinstance(magic, bool) or magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(not_torch_message(path))
    version = RestrictedUnpickler(f, path).load()
    if version != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(
            f"{path} uses legacy serialization protocol {version!r}, which is not supported"
        )
    RestrictedUnpickler(f, path).load()  # sys_info; its type_sizes are not used (see above)
    storages: dict[str, Storage] = {}
    obj = RestrictedUnpickler(f, path, storages).load()
    keys = RestrictedUnpickler(f, path).load()
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
    regular_file(path_str, "PyTorch weights file", max_bytes=MAX_WEIGHTS_BYTES,
                 error=CheckpointFormatError)
    with open(path_str, "rb") as f:
        head = f.read(512)
        f.seek(0)
        if not head:
            raise corrupt(path_str, "the file is empty")
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
                raise CheckpointFormatError(not_torch_message(path_str))
            return {k: _materialize(t, little_endian) for k, t in tensors.items()}
        except CheckpointFormatError:
            raise
        except _CORRUPTION_ERRORS as exc:
            raise corrupt(path_str, exc) from exc
