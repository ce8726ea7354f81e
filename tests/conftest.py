"""Test-session set-up: 8 simulated CPU devices, so sharding tests run on any machine.

The flag must be set before JAX initialises its backends, hence here, at collection time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
