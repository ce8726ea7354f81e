"""Joining a multi-process run: ``config.distributed`` and ``config.cluster``.

On a cluster JAX knows (SLURM, Open MPI, a TPU pod, Kubernetes via its environment) nothing is
needed beyond ``config.distributed=True``. Elsewhere (several processes on one machine, or
hosts without a scheduler) each process is told the coordinator, the number of processes and
its own index, by ``config.cluster`` or JAX's ``JAX_COORDINATOR_ADDRESS`` variable. CPU
processes exchange collectives through Gloo.

It must run before anything touches a JAX device, which is why ``kfor1.trainer.loop`` calls it
first. """

from __future__ import annotations

import jax
import ml_collections

from kfor1.trainer.config import ConfigError

__all__ = ["initialize"]

_MISSING = ("coordinator_address should be defined", "Number of processes must be defined",
            "process id of the current process must be defined")


def initialize(config: ml_collections.ConfigDict) -> None:
    """Joins the run's processes (``jax.distributed.initialize``) when ``config.distributed``.

    Raises:
      ConfigError: no cluster was detected and ``config.cluster`` does not say where the
        coordinator is, how many processes there are, or which one this is.
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    cluster = config.cluster
    kwargs = {
        "coordinator_address": cluster.coordinator_address or None,
        "num_processes": cluster.num_processes or None,
        "process_id": None if cluster.process_id < 0 else cluster.process_id,
    }
    if cluster.num_processes and kwargs["process_id"] is not None and not (
            0 <= cluster.process_id < cluster.num_processes):
        raise ConfigError(f"config.cluster.process_id={cluster.process_id} is not in "
                          f"0..{cluster.num_processes - 1} (config.cluster.num_processes)")
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        jax.config.update("jax_cpu_collectives_implementation", before)
        if "must be called before" in str(e):
            raise ConfigError(
                "config.distributed=True needs a process in which JAX has not run yet (it "
                "joins the other processes before any device is used): start training in a "
                "new process (kfor1 train), or call kfor1.trainer.distributed.initialize(config) "
                "before anything else touches JAX") from None
        if not any(text in str(e) for text in _MISSING):
            raise
        raise ConfigError(
            "config.distributed=True found no cluster (SLURM, Open MPI, TPU pod) to join; on "
            "each process set --config.cluster.coordinator_address=HOST:PORT (process 0's host) "
            "--config.cluster.num_processes=N --config.cluster.process_id=I (0..N-1), or leave "
            "config.distributed=False for one process"
        ) from None

