"""The patch: which of a model's leaves a task owns, what that costs, and how the patch trains.

Station 3 of the data's order (config -> data -> model -> **patch** -> multi-task state and step
-> files -> serving), over any Flax variables tree:

- ``kfor1.patch.spec``: the presets (``logits``, ``scale_bias``, ``depthwise``, ``stats``, ...),
  ``PatchSpec`` and ``partition``, which labels every leaf ``shared`` or ``patch:<group>``;
- ``kfor1.patch.report``: the patch's size against the model's (``(1 - p) + K x p`` models);
- ``kfor1.patch.optim``: one ``optax.partition`` that updates the patch groups and allocates
  nothing for the shared leaves.

May import: ``kfor1.models`` and ``kfor1.layers`` (to find BatchNorm and depthwise leaves by
shape) and the shared root modules (``errors``, ``tree``, ``table``). Never the multi-task
engine, the files, serving or the trainer.
"""
