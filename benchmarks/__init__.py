"""kfor1's benchmarks: scripts that print tables, grouped like the library. Measured numbers, with
the machine and the command of each, are in ``benchmarks/README.md``; none of this is a timed
test (``tests/test_benchmarks.py`` runs each at a tiny size and checks only that it works).

Run each from the repository root as a module:

- ``python -m benchmarks.suite``: kfor1 against PyTorch over a grid of models, resolutions,
  batches and precisions (``suite/``: the grid, its measured objects and sections, the PyTorch
  networks); ``benchmarks.suite.conv_impl`` (XLA's convolutions against kfor1's CPU ones) and
  ``benchmarks.suite.end_to_end`` (``kfor1 train`` on real JPEGs against its own step);
- ``python -m benchmarks.profiles``: where each path's time goes, kfor1's ops beside PyTorch's;
- ``python -m benchmarks.serving``: a mixed-task batch in one ``PatchServer`` call;
- ``python -m benchmarks.faults``: faults thrown at ``kfor1 train`` and what became of each run;
- ``python -m benchmarks.results``: ``docs/results.md`` regenerated on real data;
  ``benchmarks.results.adabn_layers``: which BatchNorm layers' statistics a task should own;
- ``bash benchmarks/device_check.sh``: the prepared check for a lent GPU machine
  (``benchmarks.device.check``, then the suite against PyTorch CUDA).

``benchmarks.common`` holds what the scripts share (the machine line, ``--json`` files, the
step timer, ``--tiny``'s compile options).
"""
