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


def test_the_serving_example_runs_as_written(tmp_path, monkeypatch):
    """With three patches where the example looks for them (frozen Lite0, 64 px)."""
    import optax

    import kfor1
    from kfor1.files.patchfile import make_patch, write_patch

    section = README.read_text().split("## Serving K tasks from one base", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    base = kfor1.load_pretrained("efficientnet_lite0")
    labels = kfor1.partition(base.variables, "scale_bias+logits")
    tasks = [kfor1.Task("flowers", 102, 64), kfor1.Task("cars", 196, 64), kfor1.Task("dtd", 47, 64)]
    state = kfor1.init_multitask(base.variables, labels, tasks,
                                 kfor1.patch_optimizer(optax.sgd(0.0), labels))
    for k, (run, task) in enumerate(zip("abc", tasks)):
        meta = {"class_names": [f"{task.name}_{i}" for i in range(task.num_classes)],
                "preprocessing": {**base.preprocessing.to_dict(), "resolution": 64},
                "base": {"model": "efficientnet_lite0"}}
        write_patch(make_patch(state, k, meta), tmp_path / "runs" / run / "patches" / task.name)
    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    namespace = {"images": images}
    exec(compile(code, str(README), "exec"), {"kfor1": kfor1, **namespace})
    assert (tmp_path / "exported" / "model.tflite").stat().st_size > 1_000_000
    assert (tmp_path / "exported" / "savedmodel" / "saved_model.pb").exists()
