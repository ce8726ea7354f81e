"""The patch table: every served task's patch stacked on a leading slot axis, beside one base.

One table serves tasks of different specs and class counts from one compiled function:

- its leaves are fixed when it is made (the union of the specs it will serve); a task that does
  not patch one of them holds the base's value there, so applying the row is a no-op for it;
- the head's last axis is padded to ``max_classes``; ``num_classes[slot]`` says how many of a
  slot's logits are real classes (the rest are masked to probability 0);
- ``capacity`` slots, empty ones holding the base's values. Filling or clearing a slot is a
  functional update of the arrays (``put``, ``clear``), so the table is an argument of the
  compiled function, never a constant: a hot-swap never recompiles.

Shapes, for a table of capacity ``T``: a leaf of base shape ``s`` is ``(T, *s)``; the head kernel
``(T, D, max_classes)``, its bias ``(T, max_classes)``; ``num_classes`` ``(T,)`` int32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfor1.errors import UserError
from kfor1.patch.spec import head_module, is_patch, partition, stats_labels
from kfor1.tree import flatten, leaf_name, module_path


class PatchTableError(UserError, ValueError):
    """A patch that does not fit the table (its leaves, classes or shapes), or a full table."""


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """What a table holds, fixed for its lifetime: hashable, so compiled functions key on it.

    ``leaves``: sorted ``params/...`` and ``batch_stats/...`` paths; ``head``: the head leaves
    among them (their last axis is classes); ``capacity``, ``max_classes``.
    """

    leaves: tuple[str, ...]
    head: tuple[str, ...]
    capacity: int
    max_classes: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PatchTable:
    """The arrays: ``rows[leaf]`` of shape ``(capacity, *leaf_shape)``, ``num_classes``."""

    rows: dict[str, jax.Array]
    num_classes: jax.Array


def spec_leaves(base_variables: Mapping[str, Any], spec: Any) -> set[str]:
    """The ``params/...`` and ``batch_stats/...`` paths a patch ``spec`` owns on this base."""
    labels = partition(base_variables, spec)
    flat_labels = flatten(labels)
    leaves = {f"params/{p}" for p, label in flat_labels.items() if is_patch(label)}
    stats = base_variables.get("batch_stats", {})
    stat_labels = stats_labels(stats, labels, spec, params=base_variables["params"])
    leaves |= {f"batch_stats/{p}" for p, label in flatten(stat_labels).items() if is_patch(label)}
    return leaves


def make_layout(
    base_variables: Mapping[str, Any], leaves: Iterable[str], capacity: int, max_classes: int,
) -> TableLayout:
    """Checks ``leaves`` against the base and fixes the table's layout."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise PatchTableError(f"capacity must be a positive number of slots, got {capacity!r}")
    base = flatten(base_variables)
    leaves = tuple(sorted(set(leaves)))
    unknown = [p for p in leaves if p not in base]
    if unknown:
        raise PatchTableError(f"the base has no {unknown[0]!r} ({len(unknown)} such leaves): "
                              "these patches were made for another model")
    head = head_module(flatten(base_variables["params"]))
    head_leaves = tuple(p for p in leaves if p.startswith("params/")
                        and module_path(p[len("params/"):]) == head
                        and leaf_name(p) in ("kernel", "bias"))
    base_classes = int(np.shape(base[f"params/{head}/kernel"])[-1])
    if not head_leaves:
        max_classes = base_classes  # Every task keeps the base's head.
    if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
        raise PatchTableError(f"max_classes must be a positive int, got {max_classes!r}")
    return TableLayout(leaves, head_leaves, capacity, max_classes)


def leaf_shape(layout: TableLayout, base: Mapping[str, Any], path: str) -> tuple[int, ...]:
    shape = tuple(np.shape(base[path]))
    return shape[:-1] + (layout.max_classes,) if path in layout.head else shape


def empty_table(layout: TableLayout, base_variables: Mapping[str, Any]) -> PatchTable:
    """A table whose every slot holds the base's values (heads: zeros, no classes)."""
    base = flatten(base_variables)
    rows = {}
    for path in layout.leaves:
        if path in layout.head:
            row = np.zeros(leaf_shape(layout, base, path), np.asarray(base[path]).dtype)
        else:
            row = np.asarray(base[path])
        rows[path] = jnp.asarray(np.broadcast_to(row, (layout.capacity, *row.shape)))
    return PatchTable(rows, jnp.zeros((layout.capacity,), jnp.int32))


def patch_row(
    layout: TableLayout, base_variables: Mapping[str, Any], variables: Mapping[str, Any],
    num_classes: int, name: str,
) -> dict[str, np.ndarray]:
    """One slot's values for a patch: its leaves, the base's where it patches none, heads
    padded to ``max_classes``. Raises ``PatchTableError`` for a patch that does not fit."""
    base = flatten(base_variables)
    leaves = flatten(variables)
    outside = sorted(set(leaves) - set(layout.leaves))
    if outside:
        raise PatchTableError(
            f"patch {name!r} patches {outside[0]!r} ({len(outside)} leaves), which this table "
            "does not serve; make the server with a spec that covers it (spec=...)"
        )
    if num_classes > layout.max_classes:
        raise PatchTableError(
            f"patch {name!r} has {num_classes} classes and this table's heads hold at most "
            f"{layout.max_classes}; make the server with max_classes={num_classes} or more"
        )
    row = {}
    for path in layout.leaves:
        want = leaf_shape(layout, base, path)
        if path not in leaves:
            if path in layout.head:
                raise PatchTableError(f"patch {name!r} has no head leaf {path!r}: it keeps the "
                                      "base's head, which this table replaces; serve it apart")
            row[path] = np.asarray(base[path])
            continue
        value = np.asarray(leaves[path])
        if path in layout.head:
            if value.shape[:-1] != want[:-1] or value.shape[-1] != num_classes:
                raise PatchTableError(f"patch {name!r}: head leaf {path} has shape "
                                      f"{value.shape}, expected {want[:-1]} + ({num_classes},)")
            pad = [(0, 0)] * (value.ndim - 1) + [(0, layout.max_classes - num_classes)]
            value = np.pad(value, pad)
        elif value.shape != want:
            raise PatchTableError(f"patch {name!r}: leaf {path} has shape {value.shape}, the "
                                  f"base {want}; it was made for another model")
        row[path] = value.astype(np.asarray(base[path]).dtype, copy=False)
    return row


@jax.jit
def _set(table: PatchTable, slot: jax.Array, row: dict[str, Any], classes: jax.Array
         ) -> PatchTable:
    rows = {p: table.rows[p].at[slot].set(row[p]) for p in table.rows}
    return PatchTable(rows, table.num_classes.at[slot].set(classes))


def put(table: PatchTable, slot: int, row: Mapping[str, np.ndarray], num_classes: int
        ) -> PatchTable:
    """The table with ``slot`` holding ``row`` (from ``patch_row``); ``table`` is unchanged."""
    return _set(table, jnp.int32(slot), dict(row), jnp.int32(num_classes))


def clear(table: PatchTable, slot: int, empty: PatchTable) -> PatchTable:
    """The table with ``slot`` reset to the empty table's values."""
    row = {p: v[0] for p, v in empty.rows.items()}
    return _set(table, jnp.int32(slot), row, jnp.int32(0))


def split_base(layout: TableLayout, base_variables: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The base's leaves that the table does not hold (shared by every task), flat."""
    return {p: jnp.asarray(v) for p, v in flatten(base_variables).items()
            if p not in layout.leaves}
