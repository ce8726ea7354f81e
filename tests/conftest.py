"""Test-session set-up: 8 simulated CPU devices, so sharding tests run on any machine.

The flag must be set before JAX initialises its backends, hence here, at collection time.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests compile the same small programs (the tiny models, the same steps at the same shapes),
# some in subprocesses: JAX's persistent compilation cache, inherited by the subprocesses through
# these variables, compiles each once. Compilation is about half of the suite's time on 2 cores.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"kfor1-test-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def colours(tmp_path_factory):
    """The colour-squares folder dataset of ``tiny_runs``."""
    from tiny_runs import write_folder

    return write_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def trained_run(colours, tmp_path_factory):
    """``(workdir, summary)`` of one uninterrupted ``tiny_runs.run_config`` run, shared by the
    trainer, workdir, patch-file and CLI tests (read it, never write to it)."""
    from tiny_runs import run_config

    from kfor1.trainer.loop import train

    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train(run_config(colours), str(workdir))


@pytest.fixture(scope="module")
def tiny():
    """Pretrained-like variables of the 5-class ``tiny_models.TinyCNN``."""
    from tiny_models import BASE_CLASSES, pretrained_like

    return pretrained_like(BASE_CLASSES)


@pytest.fixture(scope="module")
def mobilenet():
    """The paper's MobileNetV2 (width 0.35, 5 classes, no dropout) and its variables at 32 px."""
    import jax
    import jax.numpy as jnp

    import kfor1

    model = kfor1.create("mobilenet_v2_035", num_classes=5, dropout_rate=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return model, variables
