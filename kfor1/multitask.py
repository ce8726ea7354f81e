"""Multi-task state: shared parameters stored once, each patch leaf stacked over K tasks.

BatchNorm statistics of patched BN layers are stacked per task too (task-conditional BN). Heads
with different class counts live in one array, padded to the largest count; each task keeps its
real count, and padded classes are masked out of the logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfor1.spec import head_module, is_patch, stats_labels
from kfor1.tree import flatten, unflatten


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: a name, its number of classes, and (optionally) its input resolution."""

    name: str
    num_classes: int
    resolution: int | None = None

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r} needs num_classes >= 1, got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of a multi-task state: hashable, so it can live in a jitted state."""

    tasks: tuple[Task, ...]
    param_labels: tuple[tuple[str, str], ...]
    stat_labels: tuple[tuple[str, str], ...]
    head: str

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> tuple[int, ...]:
        return tuple(t.num_classes for t in self.tasks)

    @property
    def max_classes(self) -> int:
        return max(self.num_classes)

    @property
    def labels(self) -> dict[str, Any]:
        """Nested label tree of the parameters (for ``patch_optimizer``)."""
        return unflatten(dict(self.param_labels))

    def patch_paths(self) -> set[str]:
        return {p for p, label in self.param_labels if is_patch(label)}

    def shared_paths(self) -> set[str]:
        return {p for p, label in self.param_labels if not is_patch(label)}

    def frozen_paths(self, train_shared: bool) -> set[str]:
        """The parameters a run never trains: the shared ones, unless ``train_shared``."""
        return set() if train_shared else self.shared_paths()

    def patch_stat_paths(self) -> set[str]:
        return {p for p, label in self.stat_labels if is_patch(label)}

    def class_mask(self) -> np.ndarray:
        """(K, max_classes) bool: which logits are real classes of each task."""
        return np.arange(self.max_classes)[None, :] < np.asarray(self.num_classes)[:, None]


@flax.struct.dataclass
class MultiTaskState:
    """Everything that changes during training, plus the static ``layout``."""

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: Any
    layout: Layout = flax.struct.field(pytree_node=False)


def _head_leaves(head: str, flat: dict[str, Any]) -> tuple[str, str | None]:
    kernel = f"{head}/kernel"
    bias = f"{head}/bias"
    return kernel, (bias if bias in flat else None)


def init_multitask(
    variables: dict[str, Any],
    labels: dict[str, Any],
    tasks: Sequence[Task | tuple[str, int]],
    optimizer: optax.GradientTransformation | None = None,
    *,
    head: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    spec: Any = None,
) -> MultiTaskState:
    """Builds the K-task state from one pretrained model's variables.

    Each task's head starts from the pretrained head if its class count matches it, otherwise
    from zeros (a common, deterministic choice for fine-tuning heads). Apply the state with a
    model whose classifier has ``max(num_classes)`` outputs. With ``mesh``, the state is placed
    on it (patches along 'task', shared parameters replicated) before the optimiser state is
    built, so that the optimiser state inherits the same layout. ``spec``, the patch spec the
    labels come from, says which BatchNorm statistics are per task (``kfor1.stats_labels``).
    """
    tasks = tuple(t if isinstance(t, Task) else Task(*t) for t in tasks)
    if not tasks:
        raise ValueError("init_multitask needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    params = flatten(variables["params"])
    stats = flatten(variables.get("batch_stats", {}))
    flat_labels = flatten(labels)
    if set(flat_labels) != set(params):
        raise ValueError(
            "labels do not match the parameters; build them with kfor1.partition(variables, spec)"
        )
    head = head_module(params, head)
    kernel_path, bias_path = _head_leaves(head, params)
    base_classes = int(np.shape(params[kernel_path])[-1])
    num_classes = [t.num_classes for t in tasks]
    head_is_patch = is_patch(flat_labels[kernel_path])
    if not head_is_patch and any(n != base_classes for n in num_classes):
        raise ValueError(
            f"tasks have {num_classes} classes but the head {head!r} ({base_classes} classes) is "
            "shared; add 'logits' to the patch spec so each task trains its own head"
        )
    max_classes = max(num_classes) if head_is_patch else base_classes
    k = len(tasks)

    def task_head(path: str, n: int) -> np.ndarray:
        value = np.asarray(params[path])
        if n != base_classes:
            value = np.zeros(value.shape[:-1] + (n,), value.dtype)
        pad = [(0, 0)] * (value.ndim - 1) + [(0, max_classes - n)]
        return np.pad(value, pad)

    new_params = {}
    for path, value in params.items():
        if not is_patch(flat_labels[path]):
            # A copy: the train step donates the state, which must not delete the caller's arrays.
            new_params[path] = jnp.array(value)
        elif path in (kernel_path, bias_path):
            new_params[path] = jnp.stack([task_head(path, n) for n in num_classes])
        else:
            new_params[path] = jnp.broadcast_to(jnp.asarray(value), (k, *np.shape(value)))
    flat_stat_labels = flatten(stats_labels(unflatten(stats), labels, spec)) if stats else {}
    new_stats = {
        path: (jnp.broadcast_to(jnp.asarray(v), (k, *np.shape(v)))
               if is_patch(flat_stat_labels[path]) else jnp.array(v))
        for path, v in stats.items()
    }
    layout = Layout(
        tasks=tasks,
        param_labels=tuple(flat_labels.items()),
        stat_labels=tuple(flat_stat_labels.items()),
        head=head,
    )
    state = MultiTaskState(
        step=jnp.zeros((), jnp.int32),
        params=unflatten(new_params),
        batch_stats=unflatten(new_stats),
        opt_state=None,
        layout=layout,
    )
    if mesh is not None:
        from kfor1.sharding import shard_state

        state = shard_state(state, mesh)
    if optimizer is not None:
        state = state.replace(opt_state=jax.jit(optimizer.init)(state.params))
        if mesh is not None:
            # jit leaves fresh zeros (the moments) on one device: place them like their params.
            state = shard_state(state, mesh, optimizer)
    return state


def task_variables(state: MultiTaskState, k: int | str) -> dict[str, Any]:
    """Plain Flax variables of task ``k``'s single-task model (its head unpadded)."""
    layout = state.layout
    names = [t.name for t in layout.tasks]
    if isinstance(k, str):
        if k not in names:
            raise KeyError(f"no task {k!r}; tasks are {names}")
        k = names.index(k)
    if not 0 <= k < layout.num_tasks:
        raise IndexError(f"task index {k} out of range for {layout.num_tasks} tasks")
    n = layout.tasks[k].num_classes
    patch, patch_stats = layout.patch_paths(), layout.patch_stat_paths()
    kernel_path, bias_path = _head_leaves(layout.head, flatten(state.params))
    params = {}
    for path, value in flatten(state.params).items():
        value = value[k] if path in patch else value
        if path in (kernel_path, bias_path) and path in patch:
            value = value[..., :n]
        params[path] = value
    stats = {
        path: (value[k] if path in patch_stats else value)
        for path, value in flatten(state.batch_stats).items()
    }
    variables = {"params": unflatten(params)}
    if stats:
        variables["batch_stats"] = unflatten(stats)
    return variables

