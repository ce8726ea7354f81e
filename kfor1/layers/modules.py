"""Flax modules over the backend-chosen convolutions, with ``flax.linen.Conv``'s parameter layout
(kernels ``(kh, kw, in, out)``, depthwise kernels ``(kh, kw, 1, C)``), so weights move between
kfor1's models, Flax's and the converters unchanged, and a model trained on one backend serves on
another.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfor1.layers.dense import conv
from kfor1.layers.depthwise import depthwise_conv
from kfor1.layers.fused import depthwise_conv_bn_relu6, expand_depthwise_bn_relu6
from kfor1.layers.padding import Padding, as_pair

# EfficientNet's initialiser: normal with std sqrt(2 / fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """A 2-D convolution with ``flax.linen.Conv``'s parameter layout and a backend-chosen path."""

    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, return_kernel: bool = False) -> jax.Array:
        """The convolution; ``return_kernel`` returns the (promoted) kernel instead, for a
        fused kernel that computes the convolution itself."""
        kh, kw = as_pair(self.kernel_size)
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if return_kernel:
            if bias is not None:
                raise ValueError("return_kernel is for convolutions without a bias")
            return kernel
        y = conv(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
    """Depthwise convolution; its kernel is ``(kh, kw, 1, C)`` as in ``nn.Conv(groups=C)``."""

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = conv_kernel_init

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        scale: jax.Array | None = None,
        shift: jax.Array | None = None,
        in_scale: jax.Array | None = None,
        in_shift: jax.Array | None = None,
        expand_kernel: jax.Array | None = None,
    ) -> jax.Array:
        """The convolution; with ``scale`` and ``shift`` (a folded inference BatchNorm, and
        optionally the previous layer's as ``in_scale``, ``in_shift``) it returns
        ``depthwise_conv_bn_relu6``; with an ``expand_kernel`` (cin, C) too, ``x`` is that
        expansion's input (``expand_depthwise_bn_relu6``)."""
        kh, kw = as_pair(self.kernel_size)
        channels = x.shape[-1] if expand_kernel is None else expand_kernel.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
        bias = (
            self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if scale is not None:
            if bias is not None:
                shift = shift + bias * scale
            if expand_kernel is not None:
                return expand_depthwise_bn_relu6(
                    x, expand_kernel, in_scale, in_shift, kernel, scale, shift, self.strides,
                    self.padding, self.impl,
                )
            return depthwise_conv_bn_relu6(
                x, kernel, scale, shift, self.strides, self.padding, in_scale, in_shift,
                self.impl,
            )
        y = depthwise_conv(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias
