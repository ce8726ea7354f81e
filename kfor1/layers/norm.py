"""BatchNorm with a hand-written training-mode gradient.

A drop-in for ``flax.linen.BatchNorm`` over the last (channel) axis: the same variables
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), defaults, running-average update and
numerics, so checkpoints, patches and partition presets do not notice the difference.

Why: autodiff of Flax's BatchNorm materialises ``x - mean`` in the forward pass for the backward
one and differentiates through the mean and the variance separately, which takes three reductions
over the activation per layer in the backward pass. Every one of them is a pass over a tensor that
does not fit in cache, and a patch step is bandwidth-bound: BatchNorm was a large share of an
EfficientNet-Lite0 patch step on CPU (``benchmarks/README.md``). The closed-form gradient needs
two sums (``sum(dy)`` and ``sum(dy * x)``) and one elementwise pass, and keeps only ``x``, which
the convolution before it has materialised anyway.

Example:
  >>> bn = kfor1.norm.BatchNorm(momentum=0.9)
  >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 16))  # NHWC
  >>> variables = bn.init(jax.random.key(1), x, use_running_average=True)
  >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  >>> updates["batch_stats"]["mean"].shape  # running averages, moved towards x's statistics
  (16,)
  >>> bn.apply(variables, x, use_running_average=True).shape  # inference: running averages
  (8, 4, 4, 16)
  >>> y, mean, var = kfor1.norm.batch_norm_train(x, jnp.ones(16), jnp.zeros(16), 1e-5)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kfor1.layers import native


def _paired_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sum(a)`` and ``sum(a * b)`` over every axis but the last: in one pass on CPU with the
    compiled kernel (``kfor1.layers.native``; XLA makes two), else two ``jnp.sum``."""
    if (
        a.dtype == jnp.float32 and b.dtype == jnp.float32 and a.ndim >= 2
        and jax.default_backend() == "cpu" and native.depthwise_available()
    ):
        return native.channel_sums(a, b)
    axes = tuple(range(a.ndim - 1))
    return jnp.sum(a, axis=axes), jnp.sum(a * b, axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises ``x`` over every axis but the last with its own batch statistics.

    Returns ``(y, mean, var)``; ``var`` is the biased batch variance ``E[x^2] - E[x]^2`` (as in
    Flax with ``use_fast_variance``). Computed in float32 or wider; ``y`` has ``x``'s dtype.
    """
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    count = x.size // x.shape[-1]
    total, squares = _paired_sums(xf, xf)
    mean = total / count
    var = jnp.maximum(squares / count - mean * mean, 0.0)
    inv = lax.rsqrt(var + epsilon)
    gain = scale.astype(dtype) * inv
    y = (xf * gain + (bias.astype(dtype) - mean * gain)).astype(x.dtype)
    return (y, mean, var), (x, scale, bias, mean, inv)


def _backward(epsilon, residuals, cotangents):
    del epsilon
    x, scale, bias, mean, inv = residuals
    dy, dmean, dvar = cotangents
    dtype = mean.dtype
    xf, dyf = x.astype(dtype), dy.astype(dtype)
    count = x.size // x.shape[-1]
    dbias, dy_x = _paired_sums(dyf, xf)
    dscale = inv * (dy_x - mean * dbias)  # sum(dy * x_hat)
    gain = scale.astype(dtype) * inv
    # dx = gain * (dy - mean(dy) - x_hat * mean(dy * x_hat)), plus the paths through the
    # returned mean and variance (zero in training, where only the running averages use them):
    # one affine map per channel of dy and x.
    coef_x = -gain * inv * dscale / count + 2.0 * dvar / count
    offset = (
        -gain * dbias / count + gain * inv * mean * dscale / count
        - 2.0 * dvar * mean / count + dmean / count
    )
    dx = (dyf * gain + xf * coef_x + offset).astype(x.dtype)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` over the channel (last) axis, with a closed-form gradient.

    Same fields and variables as Flax's for what kfor1's models use (no ``axis_name``: under
    ``jit`` a batch sharded over devices gets global statistics anyway).

    Attributes:
      use_running_average: normalise with the running statistics (inference) instead of the
        batch's (training); set here or in the call, not both.
      momentum: the running averages' decay: ``new = momentum * old + (1 - momentum) * batch``.
      epsilon: added to the variance before its square root.
      dtype: the output's dtype; None: promoted from the input and parameters.
      param_dtype: the dtype of ``scale`` and ``bias``.
      scale_init: the initialiser of ``scale``, shape ``(C,)`` (default: ones).
      bias_init: the initialiser of ``bias``, shape ``(C,)`` (default: zeros).

    Example:
      >>> bn = kfor1.layers.BatchNorm()
      >>> x = jnp.ones((8, 4, 4, 16))  # NHWC
      >>> variables = bn.init(jax.random.key(0), x, use_running_average=True)
      >>> jax.tree.map(jnp.shape, variables)["batch_stats"]
      {'mean': (16,), 'var': (16,)}
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    # Flax's initialisers: pdoc renders them as functions and cannot resolve the annotations of
    # jax's re-exported signatures, so their pages leave them out (described in the docstring).
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    """@private"""
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    """@private"""

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, fold: bool = False
    ) -> Any:
        """Normalizes ``x``; with ``fold=True`` (inference only) returns the per-channel
        ``(scale, shift)`` with ``y = x * scale + shift`` instead, for a kernel that applies it
        as it reads or writes (``kfor1.layers.depthwise_conv_bn_relu6``)."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if fold and not use_running_average:
            raise ValueError("BatchNorm(fold=True) folds running statistics: inference only")
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if use_running_average:
            # Flax's formula, so eval outputs match it bit for bit.
            mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
            if fold:
                return mul, bias - ra_mean.value * mul
            y = (x - ra_mean.value) * mul + bias
            return jnp.asarray(y, dtype)
        y, mean, var = batch_norm_train(x.astype(dtype), scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        return y
