"""A tiny Flax CNN with BatchNorm, a depthwise convolution and a Dense head, and pretrained-like
variables for it: the one small model the engine, sharding, micro-batching and spec tests use.

Defined here, not in kfor1, on purpose: the engine must work on any Flax model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfor1.multitask.state import init_multitask
from kfor1.patch.optim import patch_optimizer
from kfor1.patch.spec import partition
from kfor1.tree import flatten, unflatten

TOL = dict(atol=1e-5, rtol=1e-5)
BASE_CLASSES = 5


class TinyCNN(nn.Module):
    """stem (3x3, stride 2) -> BN -> depthwise 3x3 -> BN -> 1x1 (with bias) -> BN -> Dense."""

    num_classes: int = 5
    channels: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(use_running_average=not train, momentum=0.9)
        x = nn.Conv(self.channels, (3, 3), strides=2, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="stem_bn")(x))
        x = nn.Conv(self.channels, (3, 3), feature_group_count=self.channels, use_bias=False,
                    name="dw")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="dw_bn")(x))
        x = nn.Conv(16, (1, 1), name="pw")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="pw_bn")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def pretrained_like(num_classes: int = 5, size: int = 16):
    """TinyCNN variables that look trained: BN scales and biases away from 1 and 0 (at bias 0,
    ReLU then a per-channel op then BN makes a BN scale's gradient exactly 0, and Adam would turn
    rounding noise into updates) and non-trivial BN statistics."""
    model = TinyCNN(num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    flat = flatten(variables["params"])
    for i, path in enumerate(sorted(flat)):
        if path.endswith(("_bn/scale", "_bn/bias")):
            noise = 0.2 * jax.random.normal(jax.random.key(10 + i), flat[path].shape)
            flat[path] = flat[path] + noise
    params = unflatten(flat)
    _, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        2.0 + 3.0 * jax.random.normal(jax.random.key(1), (8, size, size, 3)),
        train=True, mutable=["batch_stats"],
    )
    return {"params": params, "batch_stats": updates["batch_stats"]}


def make_batch(seed, num_classes, batch=4, size=16):
    """{"images": (K, B, size, size, 3), "labels": (K, B)}, labels within each task's classes."""
    key_images, key_labels = jax.random.split(jax.random.key(seed))
    k = len(num_classes)
    labels = jnp.stack([
        jax.random.randint(jax.random.fold_in(key_labels, i), (batch,), 0, n)
        for i, n in enumerate(num_classes)
    ])
    images = jax.random.normal(key_images, (k, batch, size, size, 3))
    return {"images": images, "labels": labels.astype(jnp.int32)}


def slice_batch(batch, idx):
    idx = np.asarray(idx)
    return {name: value[idx] for name, value in batch.items()}


def run_steps(step, state, batches, seed=0):
    """Runs ``step`` over ``batches``; returns the final state and the (steps, K) losses."""
    losses = []
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch, jax.random.key(seed + i))
        losses.append(metrics["loss"])
    return state, jnp.stack(losses)


def build_state(variables, spec, tasks, tx=None, **kwargs):
    """The optimiser (``tx``, default Adam 1e-2, on every patch leaf) and the K-task state."""
    labels = partition(variables, spec)
    optimizer = patch_optimizer(tx or optax.adam(1e-2), labels, **kwargs)
    return optimizer, init_multitask(variables, labels, tasks, optimizer)


def split_flat(state):
    patch = state.layout.patch_paths()
    flat = flatten(state.params)
    return ({p: v for p, v in flat.items() if p in patch},
            {p: v for p, v in flat.items() if p not in patch})


def array_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
