"""K patches on one shared network, trained and evaluated in one compiled step.

Station 4 of the data's order (config -> data -> model -> patch -> **multi-task state and step**
-> files -> serving):

- ``kfor1.multitask.state``: ``Task``, ``MultiTaskState`` (the shared leaves stored once, each
  task's patch and BatchNorm statistics stacked on a task axis), ``init_multitask`` and
  ``task_variables`` (one task's plain Flax variables);
- ``kfor1.multitask.task_axis``: resolution groups and one task's forward pass;
- ``kfor1.multitask.step``: the jitted K-task train, eval, predict and statistics steps;
- ``kfor1.multitask.sharding``: the ``('task', 'data')`` mesh and what goes where on it.

May import: ``kfor1.patch``, ``kfor1.models``, ``kfor1.layers`` and the shared root modules
(``tree``, ``microbatch``, ``errors``). Never the files, serving or the trainer: a program that
trains K patches its own way imports only this and what is below it.
"""
