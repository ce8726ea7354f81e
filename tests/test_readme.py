"""README.md's library section runs as written (with a small batch standing in for real data)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_library_example_runs_as_written():
    section = README.read_text().split("## The library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    import jax

    rng_np = np.random.default_rng(0)
    k, b = 2, jax.device_count()  # One image per device on the data axis.
    namespace = {
        "x": rng_np.normal(size=(k, b, 64, 64, 3)).astype(np.float32),
        "y": np.stack([rng_np.integers(0, 102, b), rng_np.integers(0, 196, b)]).astype(np.int32),
        "rng": jax.random.key(0),
    }
    exec(compile(code, str(README), "exec"), namespace)
    metrics, single = namespace["metrics"], namespace["single"]
    assert np.asarray(metrics["loss"]).shape == (k,)
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    assert single["params"]["head"]["logits"]["kernel"].shape[-1] == 196
