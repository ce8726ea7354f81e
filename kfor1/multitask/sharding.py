"""Placing multi-task training on devices: a ('task', 'data') mesh.

Patch leaves, per-task BN statistics and batches are split along 'task' over their K axis,
batches along 'data' over B, and shared parameters are replicated. ``jax.jit`` then partitions
the step; BatchNorm over a 'data'-sharded batch computes global statistics by itself.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kfor1.tree import flatten, unflatten

TASK, DATA = "task", "data"


def make_mesh(tasks: int = 1, data: int | None = None) -> Mesh:
    """A ('task', 'data') mesh over all devices; ``data`` defaults to what is left.

    Args:
      tasks: the size of the 'task' axis (it must divide the number of tasks K).
      data: the size of the 'data' axis; None: the devices left, ``device_count // tasks``.

    Returns:
      A ``jax.sharding.Mesh`` of shape (tasks, data), axis names ``("task", "data")``.

    Example:
      >>> mesh = kfor1.make_mesh(tasks=2)  # 8 devices: (2, 4)
      >>> dict(mesh.shape)
      {'task': 2, 'data': 4}
    """
    n = jax.device_count()
    if data is None:
        if n % tasks:
            raise ValueError(f"{n} devices cannot be split into {tasks} task shards")
        data = n // tasks
    if tasks * data != n:
        raise ValueError(
            f"mesh ({tasks} tasks x {data} data) needs {tasks * data} devices, {n} are available"
        )
    return jax.make_mesh((tasks, data), (TASK, DATA), axis_types=(AxisType.Auto, AxisType.Auto))


def _stacked(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TASK))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(state: Any, mesh: Mesh) -> dict[str, Any]:
    """Shardings of ``state.params``: patch leaves along 'task', shared ones replicated."""
    patch = state.layout.patch_paths()
    return unflatten({
        p: (_stacked(mesh) if p in patch else _replicated(mesh)) for p in flatten(state.params)
    })


def _check_tasks(state: Any, mesh: Mesh) -> None:
    k, shards = state.layout.num_tasks, mesh.shape[TASK]
    if k % shards:
        raise ValueError(
            f"{k} tasks cannot be split over a 'task' mesh axis of size {shards}; "
            "choose a task axis size that divides the number of tasks"
        )


def shard_state(
    state: Any, mesh: Mesh, optimizer: optax.GradientTransformation | None = None
) -> Any:
    """Places a ``MultiTaskState`` on ``mesh``. Pass ``optimizer`` to also place an existing
    optimiser state (its moments follow their parameters).

    Args:
      state: the multi-task state; K must divide over the mesh's 'task' axis.
      mesh: a ``make_mesh`` mesh.
      optimizer: the optax transform of ``state.opt_state``; needed when it is not None.

    Returns:
      The state with patch leaves (K, ...) and per-task statistics split along 'task', shared
      parameters and the step replicated.

    Example:
      >>> mesh = kfor1.make_mesh(tasks=2)
      >>> state = kfor1.shard_state(state, mesh, tx)
      >>> state.params["head"]["logits"]["kernel"].sharding.spec
      PartitionSpec('task',)
    """
    _check_tasks(state, mesh)
    p_shard = param_shardings(state, mesh)
    patch_stats = state.layout.patch_stat_paths()
    stats = {
        p: jax.device_put(v, _stacked(mesh) if p in patch_stats else _replicated(mesh))
        for p, v in flatten(state.batch_stats).items()
    }
    params = jax.tree.map(jax.device_put, state.params, p_shard)
    opt_state = state.opt_state
    if opt_state is not None:
        if optimizer is None:
            raise ValueError("shard_state needs the optimizer to place an existing opt_state")

        def place(value: Any, sharding: NamedSharding) -> Any:
            # Masked transforms (multi_transform) hold a MaskedNode where a leaf is not theirs.
            if isinstance(value, optax.MaskedNode):
                return value
            return jax.device_put(value, sharding)

        opt_state = optax.tree_utils.tree_map_params(
            optimizer, place, opt_state, p_shard,
            transform_non_params=lambda v: jax.device_put(v, _replicated(mesh)),
            is_leaf=lambda v: isinstance(v, optax.MaskedNode),
        )
    return state.replace(
        step=jax.device_put(state.step, _replicated(mesh)),
        params=params,
        batch_stats=unflatten(stats),
        opt_state=opt_state,
    )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places this host's (K, B_local, ...) arrays on the mesh: K over 'task', B over 'data'.

    Each host passes only its own slice of the batch axis (multi-host input pipelines).

    Args:
      batch: a pytree of host arrays, each (K, B_local, ...), e.g. ``{"images": (K, B, H, W,
        C), "labels": (K, B)}``.
      mesh: a ``make_mesh`` mesh.

    Returns:
      The same tree of global ``jax.Array`` s, (K, B_local * processes, ...), sharded
      ``P('task', 'data')``.

    Example:
      >>> batch = kfor1.shard_batch({"images": x, "labels": y}, mesh)  # x: (K, B, H, W, 3)
      >>> state, metrics = step(state, batch, jax.random.key(0))
    """
    sharding = NamedSharding(mesh, P(TASK, DATA))

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"batch arrays must be (K, B, ...), got shape {x.shape}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
