"""kfor1's BatchNorm is Flax's BatchNorm with a closed-form gradient: same variables, outputs,
statistics updates and gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfor1.layers.norm import BatchNorm, batch_norm_train


def _inputs(shape=(4, 5, 6, 8), seed=0):
    kx, ks, kb, kg = jax.random.split(jax.random.key(seed), 4)
    x = 2.0 * jax.random.normal(kx, shape) + 1.5  # A mean far from 0, as after a convolution.
    scale = 1.0 + 0.3 * jax.random.normal(ks, shape[-1:])
    bias = 0.5 * jax.random.normal(kb, shape[-1:])
    return x, scale, bias, jax.random.normal(kg, shape)


def _variables(scale, bias, features):
    return {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {
            "mean": jnp.linspace(-1, 1, features), "var": jnp.linspace(0.5, 2, features)
        },
    }


@pytest.mark.parametrize("train", [True, False])
def test_matches_flax_batchnorm_outputs_statistics_and_gradients(train):
    x, scale, bias, cotangent = _inputs()
    ours, flax_bn = (
        m(use_running_average=not train, momentum=0.9, epsilon=1e-3)
        for m in (BatchNorm, nn.BatchNorm)
    )
    variables = _variables(scale, bias, x.shape[-1])
    chex.assert_trees_all_equal_shapes_and_dtypes(
        ours.init(jax.random.key(0), x), flax_bn.init(jax.random.key(0), x)
    )

    def run(module):
        def loss(params, x):
            y, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x,
                mutable=["batch_stats"],
            )
            return jnp.sum(jax.nn.relu6(y) * cotangent), (y, updates)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    grads, (y, updates) = run(ours)
    expected_grads, (expected_y, expected_updates) = run(flax_bn)
    chex.assert_trees_all_close(y, expected_y, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(updates, expected_updates, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-4, rtol=1e-4)


def test_initialisation_does_not_move_the_running_statistics():
    x, *_ = _inputs()
    variables = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    chex.assert_trees_all_equal(
        variables["batch_stats"], {"mean": jnp.zeros(8), "var": jnp.ones(8)}
    )


def test_gradient_through_the_returned_statistics():
    """The custom VJP also carries cotangents of the returned mean and variance."""
    x, scale, bias, g = _inputs((3, 4, 4, 5), seed=1)

    def reference(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.maximum(jnp.mean(x * x, axis=(0, 1, 2)) - mean**2, 0.0)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias
        return y, mean, var

    def loss(fn):
        def value(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return jnp.sum(y * g) + jnp.sum(mean * jnp.arange(5.0)) + jnp.sum(var**2)

        return jax.grad(value, argnums=(0, 1, 2))(x, scale, bias)

    chex.assert_trees_all_close(
        loss(lambda *a: batch_norm_train(*a, 1e-3)), loss(reference), atol=1e-4, rtol=1e-4
    )


def test_bfloat16_inputs_keep_float32_statistics():
    x, scale, bias, _ = _inputs()
    variables, x16 = _variables(scale, bias, 8), x.astype(jnp.bfloat16)
    y, updates = BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(
        variables, x16, mutable=["batch_stats"]
    )
    assert y.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_dtypes(
        updates["batch_stats"], {"mean": jnp.zeros(8), "var": jnp.zeros(8)}
    )
    expected = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(
        variables, x16, mutable=["batch_stats"]
    )[0]
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(expected, np.float32), atol=5e-2
    )


def test_vmapped_per_task_statistics():
    """Per-task BatchNorm (the multi-task step's vmap over stacked variables) works through the
    custom gradient."""
    x, scale, bias, g = _inputs((2, 3, 4, 4, 8))
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), _variables(scale, bias, 8))

    def per_task(module):
        def loss(params):
            def one(p, s, xi, gi):
                y, _ = module.apply({"params": p, "batch_stats": s}, xi, mutable=["batch_stats"])
                return jnp.sum(y * gi)

            return jnp.sum(jax.vmap(one)(params, stacked["batch_stats"], x, g))

        return jax.grad(loss)(stacked["params"])

    chex.assert_trees_all_close(
        per_task(BatchNorm(use_running_average=False)),
        per_task(nn.BatchNorm(use_running_average=False)), atol=1e-4, rtol=1e-4,
    )


def test_fold_gives_the_inference_affine():
    """fold=True returns (scale, shift) with bn(x) = x * scale + shift on running statistics;
    folding batch statistics (training) is refused."""
    x, scale, bias, _ = _inputs()
    variables = _variables(scale, bias, x.shape[-1])
    bn = BatchNorm(use_running_average=True, epsilon=1e-3)
    mul, shift = bn.apply(variables, x, fold=True)
    chex.assert_trees_all_close(x * mul + shift, bn.apply(variables, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inference only"):
        BatchNorm(use_running_average=False).apply(variables, x, fold=True,
                                                   mutable=["batch_stats"])
