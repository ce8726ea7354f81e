"""What makes a patch file trustworthy: a content hash over its arrays and its metadata, and a
schema for the metadata (types, ranges, and agreement with the arrays).

Why both: a flipped byte in a float array, reordered class names or an edited resolution all
load and predict; without a check they give wrong answers silently. The hash catches any change
after export (``patch DIR is corrupt: ...``); the schema catches a file that was wrong when
written or was edited and re-hashed by hand, and turns a malformed ``patch.json`` into one line
that names the field instead of a ``KeyError`` deep in serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import flax.serialization
import numpy as np

from kfor1.errors import UserError
from kfor1.models.registry import MIN_RESOLUTION
from kfor1.tree import flatten
from kfor1.untrusted import MAX_WEIGHTS_BYTES, check_name, read_bytes, read_json

INTEGRITY_KEY = "content_sha256"
FORMAT = "kfor1-patch"
# 2: a content hash over arrays and metadata (``content_hash``), and the head's path.
FORMAT_VERSION = 2
WEIGHTS_FILE = "patch.msgpack"
META_FILE = "patch.json"


class PatchFileError(UserError, ValueError):
    """A patch file that is unreadable, corrupt, malformed, or does not fit its base."""


def content_hash(weights: bytes, meta: Mapping[str, Any]) -> str:
    """SHA-256 over the weights file's bytes and the metadata's canonical JSON (sorted keys,
    without the hash itself)."""
    rest = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def verify_hash(directory: str, weights: bytes, meta: Mapping[str, Any]) -> None:
    expected = meta.get(INTEGRITY_KEY)
    found = content_hash(weights, meta)
    if expected != found:
        raise PatchFileError(
            f"patch {directory} is corrupt: its content hash is {found[:12]}…, the file records "
            f"{str(expected)[:12]}… (changed after export); re-export it with `kfor1 export`"
        )


def read_patch_dir(directory: str, allow_unverified: bool = False) -> tuple[dict, Any]:
    """``patch.json`` and ``patch.msgpack`` of a patch directory, read as hostile input and
    checked: bounded regular files inside the directory (``kfor1.untrusted``), its format, its
    content hash, then its schema (``validate``). Returns ``(meta, variables)``.

    A patch without a content hash (format v1, or its hash removed) cannot be told from an
    edited one (rotated class names load and predict shifted labels), so it is refused unless
    ``allow_unverified`` (then it loads with a warning).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such patch directory: {directory}")
    meta_path, weights_path = (os.path.join(directory, n) for n in (META_FILE, WEIGHTS_FILE))
    for path in (meta_path, weights_path):
        if not os.path.lexists(path):
            raise PatchFileError(f"{directory} is not a kfor1 patch: {os.path.basename(path)} "
                                 "is missing; export one with `kfor1 export --workdir DIR`")
    meta = read_json(meta_path, f"patch {directory}: {META_FILE}", inside=directory,
                     error=PatchFileError)
    weights = read_bytes(weights_path, f"patch {directory}: {WEIGHTS_FILE}",
                         max_bytes=MAX_WEIGHTS_BYTES, inside=directory, error=PatchFileError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PatchFileError(f"{directory} is not a kfor1 patch (format {found!r}); export one "
                             "with `kfor1 export --workdir DIR`")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise PatchFileError(f"{directory} has format {FORMAT!r} v{version}; this kfor1 reads "
                             f"up to v{FORMAT_VERSION} — upgrade kfor1")
    if INTEGRITY_KEY in meta:
        verify_hash(directory, weights, meta)
    elif not allow_unverified:
        raise PatchFileError(
            f"patch {directory} has no content hash (format v{version}, or its hash was "
            "removed), so an edit cannot be told from the original; re-export it with "
            "`kfor1 export`, or load it with --allow-unverified (allow_unverified=True) if you "
            "trust where it came from")
    else:
        warnings.warn(f"patch {directory} has no content hash: loaded unverified, as asked",
                      stacklevel=3)
    try:
        variables = flax.serialization.msgpack_restore(weights)
    except Exception as e:  # noqa: BLE001 - msgpack raises its own kinds, and RecursionError.
        raise PatchFileError(f"patch {directory} is corrupt ({type(e).__name__}: "
                             f"{str(e)[:200]}); re-export it") from None
    validate(directory, meta, variables)
    return meta, variables


def _fail(directory: str, what: str) -> None:
    raise PatchFileError(f"patch {directory} is malformed: {what}; re-export it")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(directory: str, meta: Any, variables: Any) -> None:
    """Checks ``patch.json`` (already parsed) and the arrays against each other; raises
    ``PatchFileError`` naming the first problem."""
    if not isinstance(meta, dict):
        _fail(directory, f"patch.json holds a {type(meta).__name__}, not an object")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        _fail(directory, f"format_version is {version!r}, not an integer")
    n = meta.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _fail(directory, f"num_classes is {n!r}, not a positive integer")
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        _fail(directory, "class_names is not a list of strings")
    if len(names) != n:
        _fail(directory, f"{len(names)} class names for {n} classes")
    if len(set(names)) != len(names):
        _fail(directory, "class_names has duplicates")
    check_name(meta.get("task"), f"patch {directory}: its task", error=PatchFileError)
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("model"), str):
        _fail(directory, "base is missing or names no model")
    if not isinstance(base.get("fingerprint"), str):
        _fail(directory, "base.fingerprint is missing")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        _fail(directory, "preprocessing is missing")
    for key in ("mean", "std"):
        value = pre.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                map(_number, value)):
            _fail(directory, f"preprocessing.{key} is {value!r}, not 3 finite numbers")
    if min(pre["std"]) <= 0:
        _fail(directory, f"preprocessing.std is {pre['std']}; every std must be > 0")
    resolution = pre.get("resolution")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or (
            resolution < MIN_RESOLUTION):
        _fail(directory, f"preprocessing.resolution is {resolution!r}, not an integer >= "
                         f"{MIN_RESOLUTION}")
    crop = pre.get("crop_fraction", 0.875)
    if not _number(crop) or not 0 < crop <= 1:
        _fail(directory, f"preprocessing.crop_fraction is {crop!r}, not in (0, 1]")
    if meta.get("resolution") not in (None, resolution):
        _fail(directory, f"resolution {meta['resolution']!r} differs from preprocessing's "
                         f"{resolution}")
    if not isinstance(variables, dict):
        _fail(directory, "patch.msgpack holds no variables")
    leaves = flatten(variables)
    if not leaves:
        _fail(directory, "it holds no parameters (an empty patch tree)")
    for path, value in leaves.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            _fail(directory, f"{path} is {array.dtype}, not floating point")
        if not np.all(np.isfinite(array)):
            _fail(directory, f"{path} has {int(np.sum(~np.isfinite(array)))} non-finite values")
        if path.endswith("/var") and np.any(array < 0):
            _fail(directory, f"{path} (a BatchNorm variance) has negative values")
    head = meta.get("head")  # The head's module path (recorded since format version 2).
    if head is not None and not isinstance(head, str):
        _fail(directory, f"head is {head!r}, not a module path")
    for leaf in ("kernel", "bias") if head else ():
        path = f"params/{head}/{leaf}"
        if path in leaves and np.shape(leaves[path])[-1] != n:
            _fail(directory, f"head {path} has shape {np.shape(leaves[path])}: "
                             f"{np.shape(leaves[path])[-1]} outputs for {n} classes")
