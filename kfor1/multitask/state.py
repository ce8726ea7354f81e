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

from kfor1.patch.spec import head_module, is_patch, stats_labels
from kfor1.tree import flatten, unflatten


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: a name, its number of classes, and (optionally) its input resolution.

    Args:
      name: the task's name, unique in a run (metrics and patch directories are named after it).
      num_classes: its number of classes (at least 1): the width of its head.
      resolution: its input images' size in pixels; tasks of different resolutions run in one
        step, grouped by resolution (``make_train_step``). None: not given (one group).

    Example:
      >>> tasks = [kfor1.Task("flowers", 102), kfor1.Task("cars", 196, resolution=192)]
      >>> tasks[1].num_classes
      196
    """

    name: str
    num_classes: int
    resolution: int | None = None

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r} needs num_classes >= 1, got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of a multi-task state: hashable, so it can live in a jitted state.

    ``init_multitask`` builds it; read it as ``state.layout``.

    Attributes:
      tasks: the K tasks, in the order of the state's task axis.
      param_labels: ``(path, label)`` for every parameter leaf (``("head/logits/kernel",
        "patch")``), as ``partition`` labelled them.
      stat_labels: the same for the BatchNorm statistics (``stats_labels``).
      head: the classifier's module path (``"head/logits"`` in kfor1's models).

    Example:
      >>> layout = state.layout  # tasks ("flowers", 102) and ("cars", 196)
      >>> layout.num_tasks, layout.num_classes, layout.max_classes
      (2, (102, 196), 196)
      >>> layout.class_mask().shape  # (K, max_classes): which logits are real classes
      (2, 196)
    """

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
    """Everything that changes during training, plus the static ``layout``.

    A pytree (``flax.struct``) that jitted steps take and return; ``layout`` is static.

    Attributes:
      step: the number of training steps taken, an int32 scalar.
      params: the parameters, nested as the model's: a patch leaf stacked over the K tasks,
        (K, *shape), the head padded to (K, ..., max_classes); a shared leaf once, unstacked.
      batch_stats: the BatchNorm statistics: (K, C) where the patch owns them, else (C,).
      opt_state: the optimiser's state (None when built without an optimiser).
      layout: the static ``Layout`` (tasks, labels, head).

    Example:
      >>> state = kfor1.init_multitask(base.variables, labels, [("flowers", 102), ("cars", 196)])
      >>> state.params["head"]["logits"]["kernel"].shape  # (K, features, max_classes)
      (2, 1280, 196)
      >>> state.params["stem"]["conv"]["kernel"].shape  # shared: stored once
      (3, 3, 3, 32)
    """

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

    Args:
      variables: the pretrained model's variables, ``{"params": ..., "batch_stats": ...}``.
      labels: the label tree of its parameters (``kfor1.partition``).
      tasks: the K tasks, as ``Task`` or ``(name, num_classes)`` pairs (names unique).
      optimizer: the optimiser (``patch_optimizer``) whose state to build; None leaves
        ``opt_state`` None.
      head: the classifier's module path; default: the last Dense layer.
      mesh: a ``('task', 'data')`` mesh (``make_mesh``) to place the state on; K must divide
        over its 'task' axis. None: the default device.
      spec: the patch spec ``labels`` come from (its ``stats`` preset makes every BatchNorm
        layer's statistics per task).

    Returns:
      A ``MultiTaskState`` at step 0: patch leaves and their statistics stacked to (K, ...),
      heads padded to (K, ..., max_classes).

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")
      >>> labels = kfor1.partition(base.variables, "scale_bias+logits")
      >>> tx = kfor1.patch_optimizer(optax.adam(1e-3), labels)
      >>> tasks = [kfor1.Task("flowers", 102), kfor1.Task("cars", 196)]
      >>> state = kfor1.init_multitask(base.variables, labels, tasks, tx)
      >>> model = base.model.clone(num_classes=state.layout.max_classes)  # for the steps
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
    flat_stat_labels = flatten(stats_labels(
        unflatten(stats), labels, spec, params=variables["params"])) if stats else {}
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
        from kfor1.multitask.sharding import shard_state

        state = shard_state(state, mesh)
    if optimizer is not None:
        state = state.replace(opt_state=jax.jit(optimizer.init)(state.params))
        if mesh is not None:
            # jit leaves fresh zeros (the moments) on one device: place them like their params.
            state = shard_state(state, mesh, optimizer)
    return state


def task_variables(state: MultiTaskState, k: int | str) -> dict[str, Any]:
    """Plain Flax variables of task ``k``'s single-task model (its head unpadded).

    Args:
      state: a multi-task state.
      k: the task, by index on the task axis or by name.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of one model: task ``k``'s slice of every patch
      leaf (no task axis), the shared leaves, and a head of its own width, (..., num_classes).

    Example:
      >>> cars = kfor1.task_variables(state, "cars")
      >>> cars["params"]["head"]["logits"]["kernel"].shape
      (1280, 196)
      >>> model = base.model.clone(num_classes=196)
      >>> logits = model.apply(cars, x, train=False)  # x: (N, H, W, 3) -> (N, 196)
    """
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

