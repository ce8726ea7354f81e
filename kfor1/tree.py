"""Parameter trees as flat ``{"a/b/c": leaf}`` dicts: the form partition labels, patch files and
the step's split of patch and shared leaves all work in, since a path names a leaf in one string.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax

Flat = dict[str, Any]


def flatten(tree: Mapping[str, Any]) -> Flat:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``, in the tree's own (creation) order."""
    return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``: the inverse of ``flatten``."""
    return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def module_path(path: str) -> str:
    """``"blocks_3/bn/scale"`` -> ``"blocks_3/bn"`` (the leaf's module; "" at the top)."""
    return path.rsplit("/", 1)[0] if "/" in path else ""


def leaf_name(path: str) -> str:
    """``"blocks_3/bn/scale"`` -> ``"scale"``."""
    return path.rsplit("/", 1)[-1]
