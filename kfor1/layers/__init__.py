"""The layers kfor1's models are built from: convolutions whose implementation is chosen for the
backend, and BatchNorm with a closed-form training gradient.

On the CPU (``impl="fast_cpu"``, what ``"auto"`` picks there) depthwise convolutions are sums of
shifted multiply-adds or a compiled kernel, 1x1 convolutions matrix products, a stem a product
over gathered patches, and inference blocks fused into one kernel; on GPU/TPU (``"xla"``) XLA's
own convolutions run. Every path computes the same result from the same parameters.

The floor of the model station: may import nothing of kfor1 but the shared root modules.

Modules of this package, in the order they build on each other:

- ``padding``: the implementation choice, TensorFlow-style padding, shared window arithmetic;
- ``native``: the compiled CPU kernels (C++ in ``csrc/``, built on first use, XLA FFI);
- ``depthwise``: the depthwise convolution and its gradients;
- ``dense``: dense convolutions (1x1 products, few-channel stems);
- ``fused``: inference blocks in one kernel (BatchNorm + ReLU6, the 1x1 expansion);
- ``modules``: ``Conv`` and ``DepthwiseConv``, ``flax.linen`` modules over the above;
- ``norm``: ``BatchNorm``, Flax's, with a closed-form training gradient.

Example:
  >>> x = jnp.ones((2, 32, 32, 16))  # NHWC
  >>> kfor1.layers.depthwise_conv(x, jnp.ones((3, 3, 1, 16)), strides=2).shape  # (kh, kw, 1, C)
  (2, 16, 16, 16)
  >>> kfor1.layers.conv(x, jnp.ones((1, 1, 16, 24))).shape  # 1x1: a matrix product off XLA
  (2, 32, 32, 24)
  >>> layer = kfor1.layers.DepthwiseConv(kernel_size=5, strides=2)
  >>> variables = layer.init(jax.random.key(0), x)
  >>> variables["params"]["kernel"].shape, layer.apply(variables, x).shape
  ((5, 5, 1, 16), (2, 16, 16, 16))
  >>> kfor1.layers.resolve_impl("auto")  # on the CPU backend; "xla" on GPU/TPU
  'fast_cpu'
"""

from kfor1.layers import native, norm
from kfor1.layers.dense import IM2COL_MAX_CHANNELS, conv
from kfor1.layers.depthwise import depthwise_conv
from kfor1.layers.fused import (
    EXPAND_FUSE_MAX_CHANNELS,
    depthwise_conv_bn_relu6,
    expand_depthwise_bn_relu6,
    fused_depthwise_available,
)
from kfor1.layers.modules import Conv, DepthwiseConv, conv_kernel_init
from kfor1.layers.norm import BatchNorm
from kfor1.layers.padding import IMPLEMENTATIONS, Impl, Padding, resolve_impl, resolve_padding

__all__ = [
    "EXPAND_FUSE_MAX_CHANNELS",
    "IM2COL_MAX_CHANNELS",
    "IMPLEMENTATIONS",
    "BatchNorm",
    "Conv",
    "DepthwiseConv",
    "Impl",
    "Padding",
    "conv",
    "conv_kernel_init",
    "depthwise_conv",
    "depthwise_conv_bn_relu6",
    "expand_depthwise_bn_relu6",
    "fused_depthwise_available",
    "native",
    "norm",
    "resolve_impl",
    "resolve_padding",
]
