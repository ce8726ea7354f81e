"""Base files: the shared network that a jointly trained run (``train_shared=True``) ends with.

A frozen-backbone run's patches apply to the pretrained weights everyone has; a run that trains
its backbone changes them, so its patches need the network it ended with. That network is
exported once per run, beside the patches::

    base/base.msgpack   every variable of the base model: the trained shared leaves, and the
                        patch leaves (BN scale/bias and statistics, head, ...) at their pretrained
                        values, which each task's patch replaces
    base/base.json      format, model name and fields, preprocessing, the fingerprint the
                        run's patches record, the patch leaves it excludes, where it started

The fingerprint is the one ``kfor1.files.patchfile`` checks (SHA-256 over every leaf a patch does
not replace), so a patch applies to its run's base and is refused on any other. Files are written
atomically (``atomic_write``): an interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from kfor1.errors import UserError
from kfor1.files.atomic import atomic_write
from kfor1.multitask.state import MultiTaskState, task_variables
from kfor1.tree import flatten, unflatten
from kfor1.untrusted import MAX_WEIGHTS_BYTES, read_bytes, read_json

FORMAT = "kfor1-base"
FORMAT_VERSION = 1
WEIGHTS_FILE = "base.msgpack"
META_FILE = "base.json"


class BaseFileError(UserError, ValueError):
    """An exported base that is missing, unreadable, or not the network its record says."""


def fingerprint(variables: dict[str, Any], exclude: Iterable[str] = frozenset()) -> str:
    """SHA-256 over every leaf (path, dtype, shape, bytes) not in ``exclude``."""
    exclude = set(exclude)
    digest = hashlib.sha256()
    for path, value in sorted(flatten(variables).items()):
        if path in exclude:
            continue
        value = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{path}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def patch_leaves(state: MultiTaskState) -> set[str]:
    """The ``params/...`` and ``batch_stats/...`` paths each task's patch holds."""
    layout = state.layout
    return {f"params/{p}" for p in layout.patch_paths()} | {
        f"batch_stats/{p}" for p in layout.patch_stat_paths()
    }


def trained_base(state: MultiTaskState, start: dict[str, Any]) -> dict[str, Any]:
    """The base a jointly trained run ends with: ``state``'s shared leaves (trained) and
    ``start``'s (the pretrained variables the run began from) everywhere a patch goes."""
    keep = patch_leaves(state)
    trained = flatten(task_variables(state, 0))
    return unflatten({path: np.asarray(value if path in keep else trained[path])
                      for path, value in flatten(start).items()})


def _module_fields(model: Any) -> dict[str, Any]:
    """The module's JSON-scalar fields (rebuilding it from its name and these gives the same
    architecture: MobileNetV2's torchvision flavour is its padding and BN epsilon)."""
    fields = {}
    for name in getattr(model, "__dataclass_fields__", {}):
        if name in ("parent", "name"):
            continue
        value = getattr(model, name, None)
        if isinstance(value, (str, int, float, bool)):
            fields[name] = value
    return fields


def export_base(
    variables: dict[str, Any], model: Any, patch_leaves: Iterable[str],
    directory: str | os.PathLike, meta: dict[str, Any],
) -> str:
    """Writes a base model to ``directory`` (``base.msgpack`` and ``base.json``).

    Args:
      variables: the base's full Flax variables (``{"params": ..., "batch_stats": ...}``).
      model: its Flax module (its scalar fields are recorded, to rebuild it).
      patch_leaves: the ``params/...``/``batch_stats/...`` paths each task's patch replaces;
        the fingerprint leaves them out, as the patches' does.
      directory: where to write (created).
      meta: at least ``model`` (its registered name) and ``preprocessing`` (a dict); more keys
        (``started_from``, ``step``) are kept.

    Returns:
      The fingerprint (a SHA-256 hex string) that the run's patches record.

    Example:
      >>> fp = kfor1.export_base(variables, model, kfor1.files.basefile.patch_leaves(state),
      ...                        "runs/mtl/base", {"model": "efficientnet_lite0",
      ...                                          "preprocessing": preprocessing.to_dict()})
      >>> kfor1.load_base_dir("runs/mtl/base").name
      'efficientnet_lite0'
    """
    patch_leaves = sorted(patch_leaves)
    arrays = jax.tree.map(np.asarray, variables)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "fields": _module_fields(model),
        "fingerprint": fingerprint(arrays, exclude=patch_leaves),
        "patch_leaves": patch_leaves,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_FILE),
                 flax.serialization.msgpack_serialize(arrays))
    atomic_write(os.path.join(directory, META_FILE), json.dumps(record, indent=2))
    return record["fingerprint"]


def read_base_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``base.json`` of an exported base, its format checked."""
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    for path in (meta_path, os.path.join(directory, WEIGHTS_FILE)):
        if not os.path.exists(path):
            raise BaseFileError(
                f"{directory} is not an exported kfor1 base: {os.path.basename(path)} is "
                "missing; a train_shared run writes one as <workdir>/base (or `kfor1 export`)"
            )
    meta = read_json(meta_path, f"base {directory}: {META_FILE}", inside=directory,
                     error=BaseFileError)
    if not isinstance(meta, dict):
        raise BaseFileError(f"{meta_path} holds a {type(meta).__name__}, not a base's record")
    version = meta.get("format_version", 0)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise BaseFileError(
            f"{directory} has format {meta.get('format')!r} v{version!r}; this "
            f"kfor1 reads {FORMAT!r} up to v{FORMAT_VERSION} — upgrade kfor1"
        )
    leaves = meta.get("patch_leaves")
    for key, ok in (("fingerprint", isinstance(meta.get("fingerprint"), str)),
                    ("patch_leaves", isinstance(leaves, list)
                     and all(isinstance(x, str) for x in leaves)),
                    ("fields", isinstance(meta.get("fields", {}), dict)),
                    ("preprocessing", isinstance(meta.get("preprocessing"), dict))):
        if not ok:
            raise BaseFileError(f"base {directory} is malformed: {META_FILE} {key} is missing "
                                "or of the wrong type; re-export the run")
    return meta


def load_base_dir(directory: str | os.PathLike, model: str | None = None) -> Any:
    """An exported base as a ``kfor1.models.Pretrained``, its architecture rebuilt from the
    record, its shapes and fingerprint verified (a file changed since export is refused).

    Args:
      directory: an exported base (``base.msgpack`` and ``base.json``), e.g. a ``train_shared``
        run's ``<workdir>/base``.
      model: the model ``base.json`` records, named by you: needed (and only then imported)
        for a user model that is not registered in this process.

    Returns:
      A ``Pretrained`` with the trained backbone's variables and preprocessing.

    Example:
      >>> base = kfor1.load_base_dir("runs/mtl/base")
      >>> variables = kfor1.apply_patch(base.variables, kfor1.load_patch("runs/mtl/patches/a"))
    """
    from kfor1.models import Preprocessing, Pretrained, create, get_entry, imagenet_class_names
    from kfor1.models.convert import WeightMismatchError, check_shapes
    from kfor1.models.registry import check_named_by_file

    directory = os.fspath(directory)
    meta = read_base_meta(directory)
    name = check_named_by_file(meta.get("model"), f"base {directory} ({META_FILE} model)",
                               named_by_user=model)
    data = read_bytes(os.path.join(directory, WEIGHTS_FILE),
                      f"base {directory}: {WEIGHTS_FILE}", max_bytes=MAX_WEIGHTS_BYTES,
                      inside=directory, error=BaseFileError)
    try:
        variables = flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises its own kinds, and RecursionError.
        raise BaseFileError(f"{directory}/{WEIGHTS_FILE} is corrupt ({type(e).__name__}: "
                            f"{str(e)[:200]}); re-export the run") from None
    if not isinstance(variables, dict):
        raise BaseFileError(f"{directory}/{WEIGHTS_FILE} holds no variables; re-export the run")
    found = fingerprint(variables, exclude=meta["patch_leaves"])
    if found != meta["fingerprint"]:
        raise BaseFileError(f"{directory}/{WEIGHTS_FILE} was changed after export (fingerprint "
                            f"{found[:12]}…, recorded {meta['fingerprint'][:12]}…); re-export it")
    entry = get_entry(name)
    fields = meta.get("fields", {})
    options = {k: v for k, v in fields.items() if k != "num_classes"
               and (not entry.user or entry.accepts(k))}
    model = create(name, num_classes=fields.get("num_classes"), **options)
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    size = preprocessing.resolution
    try:
        check_shapes(jax.eval_shape(model.init, jax.random.key(0),
                                    jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)),
                     variables, f"the base in {directory}")
    except WeightMismatchError as e:
        raise BaseFileError(f"{e}; was it exported by another kfor1 version?") from None
    n = int(model.num_classes)
    class_names = imagenet_class_names() if n == 1000 else tuple(f"class_{i}" for i in range(n))
    variables = jax.tree.map(jnp.asarray, unflatten(flatten(variables)))
    return Pretrained(name, model, variables, preprocessing, class_names, directory)
