"""A tiny Flax CNN with BatchNorm, a depthwise convolution and a Dense head, for engine tests.

Defined here, not in kfor1, on purpose: the engine must work on any Flax model.
"""

import flax.linen as nn


class TinyCNN(nn.Module):
    num_classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(use_running_average=not train, momentum=0.9)
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="stem_bn")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="dw")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="dw_bn")(x))
        x = nn.Conv(16, (1, 1), name="pw")(x)
        x = nn.relu(nn.BatchNorm(**bn, name="pw_bn")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))
