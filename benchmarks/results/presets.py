"""Every patch preset trains the network it ships, and scores what the served patch scores.

``python -m benchmarks.results.presets`` trains EfficientNet-Lite0 on scikit-learn's digits
(64 px, 150 steps of 32, ``kfor1.trainer.config.base_config()`` defaults otherwise) once per
patch: each preset with the head, and a ``patch_rules`` subset of BatchNorm layers (the head
and the last three blocks' BatchNorms). For each it prints the test accuracy the trainer's
``evaluate`` reports, the accuracy of the exported patch files answered by ``PatchServer`` on
the same images (decoded and cropped as a server does), and the difference to ``logits``
alone. Issue 36's acceptance: the two accuracies are equal, and no patch scores more than 2
points below ``logits``. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine_line, write_json

PATCHES = ("logits", "scale_bias+logits", "depthwise+logits", "bias+logits", "stats+logits",
           "input_stats+logits", "input_stats+depthwise+logits", "rules")
RULES = [("head/.*", "patch:logits"), ("blocks_1[345]/.*/bn/.*", "patch:scale_bias"),
         (".*", "shared")]


def run(patch: str, workdir: Path, steps: int, resolution: int) -> dict:
    from kfor1.data.decode import decode_example
    from kfor1.files.patchfile import load_patch
    from kfor1.images import center_crop_resize
    from kfor1.serve import PatchServer
    from kfor1.trainer.config import base_config, task
    from kfor1.trainer.loop import train
    from kfor1.trainer.workdir import restore

    c = base_config()
    c.tasks = [task("digits", resolution=resolution)]
    if patch == "rules":
        c.patch_rules = RULES
    else:
        c.patch = patch
    c.num_steps, c.batch_size, c.eval_batch_size = steps, 32, 128
    c.progress, c.log_every, c.checkpoint_every = False, 50, steps
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(c, str(workdir))
    s, _ = restore(str(workdir))
    t = s.tasks[0]
    examples = list(t.test.map(decode_example).as_numpy_iterator())
    images = np.stack([center_crop_resize(e["image"], resolution, s.eval_crop_fraction)
                       for e in examples])
    server = PatchServer(s.base, [load_patch(workdir / "patches" / "digits")])
    out = server.predict(images, ["digits"] * len(images))
    served = float(np.mean([np.argmax(p) == e["label"] for (_, p), e in zip(out, examples)]))
    result = summary["tasks"]["digits"]
    return {"patch": patch, "parameters": result["patch_parameters"],
            "evaluate": result["accuracy"], "served": served}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", default=",".join(PATCHES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory(prefix="kfor1-presets-") as root:
        for patch in args.patches.split(","):
            rows.append(run(patch, Path(root) / patch.replace("+", "_"), args.steps,
                            args.resolution))
            print(f"{patch}: evaluate {rows[-1]['evaluate']:.4f}, served "
                  f"{rows[-1]['served']:.4f}", flush=True)
    logits = next((r["evaluate"] for r in rows if r["patch"] == "logits"), None)
    print("\n| patch | trainable | evaluate | served patch | vs logits (points) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        gap = "" if logits is None else f"{100 * (r['evaluate'] - logits):+.1f}"
        print(f"| `{r['patch']}` | {r['parameters']:,} | {100 * r['evaluate']:.1f} | "
              f"{100 * r['served']:.1f} | {gap} |")
    write_json(args.json, rows)
    equal = all(r["evaluate"] == r["served"] for r in rows)
    close = logits is None or all(r["evaluate"] >= logits - 0.02 for r in rows)
    print(f"\nevaluate == served for every patch: {equal}; none more than 2 points below "
          f"logits: {close}")
    return 0 if equal and close else 1


if __name__ == "__main__":
    sys.exit(main())
