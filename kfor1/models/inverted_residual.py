"""The inverted-residual network that MobileNetV2 and EfficientNet-Lite both are.

Both are a conv stem, a stack of inverted residual blocks (1x1 expand, kxk depthwise, 1x1 linear
projection, identity shortcut when shapes allow), a 1x1 "top" convolution, global average
pooling and a linear classifier. They differ only in their block table, padding rule and
BatchNorm epsilon, so one module with a block table serves both, and both get the same readable
parameter tree::

    stem/{conv,bn}
    blocks_<i>/{expand,depthwise,project}/{conv,bn}   (no `expand` when the ratio is 1)
    top/{conv,bn}
    head/logits
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfor1.layers import (
    EXPAND_FUSE_MAX_CHANNELS,
    Conv,
    DepthwiseConv,
    Padding,
    fused_depthwise_available,
)
from kfor1.layers.norm import BatchNorm


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block: channels in and out, expansion, depthwise kernel, stride."""

    in_features: int
    out_features: int
    expand_ratio: int
    kernel_size: int
    stride: int

    @property
    def expanded_features(self) -> int:
        return self.in_features * self.expand_ratio

    @property
    def has_shortcut(self) -> bool:
        return self.stride == 1 and self.in_features == self.out_features


def relu6(x: jax.Array) -> jax.Array:
    # jax.nn.relu6 has a custom JVP (a mask); differentiating jnp.clip instead goes through
    # max/min's tie-splitting rule: selects and two divides per element, ~15% of a train step.
    return jax.nn.relu6(x)


class ConvBN(nn.Module):
    """Convolution (dense or depthwise), BatchNorm, optional ReLU6."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    depthwise: bool = False
    activation: bool = True
    padding: Padding = "SAME"
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool,
        *,
        defer: bool | str = False,
        fuse: bool = False,
        input_affine: tuple[jax.Array, jax.Array] | None = None,
        expand_kernel: jax.Array | None = None,
    ) -> Any:
        """``relu6(bn(conv(x)))``. For fused inference (see ``InvertedResidual``): ``defer``
        returns ``(conv(x), (scale, shift))``, the BatchNorm folded and the ReLU6 left to the
        next layer, and ``defer="kernel"`` (1x1) ``(kernel (cin, C), (scale, shift))``, the
        convolution left to it too; ``fuse`` (depthwise) runs ``layers.depthwise_conv_bn_relu6``
        on ``x``, with ``input_affine`` the previous layer's deferred BatchNorm, or with
        ``expand_kernel`` ``layers.expand_depthwise_bn_relu6`` on the expansion's input."""
        # PyTorch-style int padding is the symmetric (k - 1) // 2 for this block's kernel.
        padding = (self.kernel_size - 1) // 2 if self.padding == "SYMMETRIC" else self.padding
        bn = BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="bn",
        )
        if fuse:
            if train or not (self.depthwise and self.activation):
                raise ValueError("fuse is for depthwise layers with ReLU6 in inference")
            scale, shift = bn(jnp.zeros((1, self.features), x.dtype), fold=True)
            in_scale, in_shift = input_affine if input_affine is not None else (None, None)
            return DepthwiseConv(
                self.kernel_size, self.strides, padding, impl=self.conv_impl, dtype=self.dtype,
                name="conv",
            )(x, scale, shift, in_scale, in_shift, expand_kernel)
        if defer == "kernel":
            if train or not self.activation or self.depthwise or self.kernel_size != 1:
                raise ValueError('defer="kernel" is for 1x1 layers with ReLU6 in inference')
            kernel = Conv(
                self.features, 1, self.strides, padding, impl=self.conv_impl, dtype=self.dtype,
                name="conv",
            )(x, return_kernel=True)
            return kernel.reshape(kernel.shape[-2:]), bn(
                jnp.zeros((1, self.features), kernel.dtype), fold=True
            )
        if self.depthwise:
            x = DepthwiseConv(
                self.kernel_size, self.strides, padding, impl=self.conv_impl, dtype=self.dtype,
                name="conv",
            )(x)
        else:
            x = Conv(
                self.features, self.kernel_size, self.strides, padding, impl=self.conv_impl,
                dtype=self.dtype, name="conv",
            )(x)
        if defer:
            if train or not self.activation:
                raise ValueError("defer is for layers with ReLU6 in inference")
            return x, bn(x, fold=True)
        x = bn(x)
        return relu6(x) if self.activation else x


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand, depthwise, linear projection, shortcut, stochastic depth."""

    spec: BlockSpec
    drop_path_rate: float = 0.0
    padding: Padding = "SAME"
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        common = dict(
            padding=self.padding, bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
            conv_impl=self.conv_impl, dtype=self.dtype,
        )
        inputs = x
        # Inference on CPU: the expand layer's BatchNorm and ReLU6, the depthwise convolution and
        # its BatchNorm and ReLU6 run as one compiled kernel (layers.depthwise_conv_bn_relu6).
        fuse = not train and fused_depthwise_available(
            self.dtype or x.dtype, spec.kernel_size, self.conv_impl
        )
        affine = expand_kernel = None
        if spec.expand_ratio != 1:
            expand = ConvBN(spec.expanded_features, 1, name="expand", **common)
            if fuse and spec.in_features <= EXPAND_FUSE_MAX_CHANNELS:
                # Few input channels: the expansion too is computed inside the kernel.
                expand_kernel, affine = expand(x, train, defer="kernel")
            elif fuse:
                x, affine = expand(x, train, defer=True)
            else:
                x = expand(x, train)
        x = ConvBN(
            spec.expanded_features, spec.kernel_size, spec.stride, depthwise=True,
            name="depthwise", **common,
        )(x, train, fuse=fuse, input_affine=affine, expand_kernel=expand_kernel)
        x = ConvBN(spec.out_features, 1, activation=False, name="project", **common)(x, train)
        if not spec.has_shortcut:
            return x
        if train and self.drop_path_rate > 0:
            # Stochastic depth: drop the residual branch per example.
            keep = 1.0 - self.drop_path_rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
            x = jnp.where(mask, x / keep, 0).astype(x.dtype)
        return x + inputs


class Head(nn.Module):
    """Dropout and the linear classifier (its parameters are ``head/logits``)."""

    num_classes: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)


class InvertedResidualNet(nn.Module):
    """A MobileNetV2-family classifier for NHWC images; see the module docstring.

    ``num_classes=0`` returns the pooled features instead of logits. ``padding`` is 'SAME'
    (TensorFlow's rule, for weights trained in TensorFlow/Keras) or 'SYMMETRIC' (PyTorch's).
    """

    blocks: Sequence[BlockSpec]
    stem_features: int
    top_features: int
    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.0
    padding: str = "SAME"
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"expected images of shape (batch, height, width, 3) (NHWC), got {x.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        common = dict(
            padding=self.padding, bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
            conv_impl=self.conv_impl, dtype=self.dtype,
        )
        x = ConvBN(self.stem_features, 3, 2, name="stem", **common)(x, train)
        for i, spec in enumerate(self.blocks):
            rate = self.drop_path_rate * i / len(self.blocks)
            x = InvertedResidual(spec, rate, name=f"blocks_{i}", **common)(x, train)
        x = ConvBN(self.top_features, 1, name="top", **common)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if not self.num_classes:
            return x
        logits = Head(self.num_classes, self.dropout_rate, self.dtype, name="head")(x, train)
        return logits.astype(jnp.float32)
