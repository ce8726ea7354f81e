"""The trainer: a config becomes a run directory. The top of the house; nothing in the library
imports it (``tests/test_house.py`` fails if anything outside this package does, except the
``python -m kfor1`` entry point).

In the order a run reads:

- ``config``, ``config_ranges``, ``config_help``, ``flags``: the ml_collections defaults, every
  field's allowed values, what each field means (``--help-config``), ``--config.FIELD=VALUE``
  overrides;
- ``experiment``: a config resolved into a base, tasks, a spec, labels, an optimiser and a mesh;
  ``dryrun`` checks that much without reading weights or data;
- ``adabn``: each task's BatchNorm statistics estimated before training (``stats`` patches);
- ``loop``: ``train(config, workdir)``, top-down; ``distributed`` joins a multi-process run;
- ``evaluate``, ``metrics``, ``checkpoint``, ``health``: accuracy, logs and the summary, verified
  orbax checkpoints, the per-step health check and stop signals;
- ``workdir``: the run directory's layout and lock; eval and export from it;
- ``sweep``, ``sweep_report``: every patch over a learning-rate grid, chosen on validation;
- ``cli``, ``cli_files``, ``compile_cache``: the ``kfor1`` command (``cli_files``: the commands
  that read files others may have written) and JAX's persistent compilation cache.

May import: anything in kfor1.
"""
