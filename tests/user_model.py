"""A Flax model that kfor1 does not define, for the user-model tests: configs name it as
``model="tests.user_model:factory"`` (or ``...:with_weights``, which also loads weights)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class UserNet(nn.Module):
    """conv -> BN -> depthwise -> BN -> Dense, named as a user would, not as kfor1 does."""

    num_classes: int = 7
    width: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(use_running_average=not train, momentum=0.9, dtype=self.dtype)
        x = nn.Conv(self.width, (3, 3), strides=2, use_bias=False, dtype=self.dtype,
                    name="features_conv")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="features_norm")(x))
        x = nn.Conv(self.width, (3, 3), feature_group_count=self.width, use_bias=False,
                    dtype=self.dtype, name="features_dw")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="features_dw_norm")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x.mean((1, 2)))


def factory(num_classes: int = 7, dtype: jnp.dtype = jnp.float32) -> UserNet:
    """What a config names: takes ``num_classes`` and the one option it has, ``dtype``."""
    return UserNet(num_classes=num_classes, dtype=dtype)


factory.preprocessing = {"mean": [127.5] * 3, "std": [127.5] * 3, "resolution": 32}


def load(model: UserNet, path: str | None) -> dict:
    """'Pretrained' weights: a fixed seed other than kfor1's default (so a test can tell)."""
    return model.init(jax.random.key(123), jnp.zeros((1, 32, 32, 3)))


def with_weights(num_classes: int = 7) -> UserNet:
    return UserNet(num_classes=num_classes)


with_weights.preprocessing = factory.preprocessing
with_weights.load = load


class _Stem(nn.Module):
    width: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.width, (3, 3), strides=2, use_bias=False, dtype=self.dtype,
                    name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                            name="bn")(x)


class StemNet(nn.Module):
    """UserNet with its first convolution and BatchNorm in a module of their own, as the
    ``input_stats`` patch needs (``kfor1.patch.spec.input_batchnorm``)."""

    num_classes: int = 7
    width: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(_Stem(self.width, self.dtype, name="stem")(x, train))
        x = nn.Conv(self.width, (3, 3), feature_group_count=self.width, use_bias=False,
                    dtype=self.dtype, name="dw")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 name="dw_norm")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x.mean((1, 2)))


def stem_factory(num_classes: int = 7, dtype: jnp.dtype = jnp.float32) -> StemNet:
    return StemNet(num_classes=num_classes, dtype=dtype)


stem_factory.preprocessing = factory.preprocessing
