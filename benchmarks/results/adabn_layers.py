"""Which BatchNorm layers should a task re-estimate? AdaBN (the ``stats`` patch) layer by layer.

Issue 14 expected ``stats+logits`` (every BatchNorm layer's statistics re-estimated on the
task's images, AdaBN) to beat ``logits`` on data whose colour statistics differ from ImageNet.
On digits and grayscale CIFAR-10 it did not (``docs/results.md``); on low-contrast images it
does, and re-estimating the stem's statistics alone (the ``input_stats`` patch) does better
still. This measures it with converged linear probes, so the head's optimisation is out of the
question: for each variant, the BatchNorm
statistics of the pretrained EfficientNet-Lite0 are re-estimated on the training images for the
chosen layers only (in one training-mode pass where the other layers keep ImageNet's
statistics, so every estimate sees the network it will be used in), then a logistic regression
is fitted on the pooled features of the train split (standardised) and scored on the test split.

Variants: ImageNet's statistics; all layers (AdaBN, what ``stats`` does); only the first N
BatchNorm layers in the order the network calls them; all but the linear projections; a 50/50
mixture of ImageNet's and the task's statistics in every layer (the moments of the mixture).
Data: scikit-learn's digits, or CIFAR-10 (colour or grayscale) from an ImageFolder directory;
``--contrast C`` maps every pixel value x to ``128 + C (x - 128)`` (C = 0.05: a washed-out scan).

    python -m benchmarks.results.adabn_layers --data digits --resolution 32
    python -m benchmarks.results.adabn_layers --data digits --resolution 32 --contrast 0.05
    python -m benchmarks.results.adabn_layers --data cifar-gray --resolution 64
    python -m benchmarks.results.adabn_layers --tiny   # 200 digits, two variants: checks it runs
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import kfor1
from benchmarks.common import SHARED_DATA, write_json
from kfor1.layers.norm import BatchNorm as KBatchNorm
from kfor1.tree import flatten, unflatten

# weight(index of the BN layer in call order, its path) -> share of the task's statistics.
Weight = Callable[[int, str], float]
VARIANTS: dict[str, Weight] = {
    "all layers (AdaBN, the stats patch)": lambda i, p: 1.0,
    "stem only": lambda i, p: float(i < 1),
    "first 3": lambda i, p: float(i < 3),
    "first 8": lambda i, p: float(i < 8),
    "first 16": lambda i, p: float(i < 16),
    "all but the linear projections": lambda i, p: float("project" not in p),
    "50/50 mixture, all layers": lambda i, p: 0.5,
}


def load_data(name: str, resolution: int, per_class: int, cifar: str, normalize,
              contrast: float = 1.0) -> tuple:
    """``(x_train, y_train, x_test, y_test)``: normalised float32 (N, R, R, 3) and labels."""
    if name == "digits":
        from kfor1.data.digits import digits_arrays

        d = digits_arrays()
        (xtr, ytr), (xte, yte) = d["train"], d["test"]
        if per_class:
            keep = np.concatenate([np.flatnonzero(ytr == c)[:per_class] for c in range(10)])
            xtr, ytr = xtr[keep], ytr[keep]
    else:
        from PIL import Image

        def split(folder: str, n: int):
            classes = sorted(os.listdir(os.path.join(cifar, folder)))
            xs, ys = [], []
            for c, cls in enumerate(classes):
                files = sorted(os.listdir(os.path.join(cifar, folder, cls)))[:n]
                for f in files:
                    image = Image.open(os.path.join(cifar, folder, cls, f))
                    if name == "cifar-gray":
                        xs.append(np.repeat(np.asarray(image.convert("L"))[..., None], 3, -1))
                    else:
                        xs.append(np.asarray(image.convert("RGB")))
                    ys.append(c)
            return np.stack(xs), np.array(ys)

        (xtr, ytr), (xte, yte) = split("train", per_class or 150), split("test", 60)

    def prepare(x):
        x = 128 + contrast * (np.asarray(x, np.float32) - 128)
        out = []
        for i in range(0, len(x), 256):
            part = jnp.asarray(x[i:i + 256], jnp.float32)
            out.append(np.asarray(normalize(jax.image.resize(
                part, (len(part), resolution, resolution, 3), "bicubic"))))
        return np.concatenate(out)

    return prepare(xtr), ytr, prepare(xte), yte


def estimate(model: nn.Module, variables: dict[str, Any], x: np.ndarray, weight: Weight,
             batch: int) -> dict[str, Any]:
    """BatchNorm statistics with each layer's task share ``weight(i, path)``: the batch moments
    pooled over ``x``, mixed with ImageNet's as the moments of a mixture; one pass in which each
    layer normalises with what it will use."""

    order: list[str] = []  # BatchNorm paths in call order, recorded while tracing.

    def run(images):
        found, count = {}, [0]

        def intercept(next_fun, args, kwargs, context):
            bn = context.module
            if context.method_name != "__call__" or not isinstance(bn, (nn.BatchNorm,
                                                                         KBatchNorm)):
                return next_fun(*args, **kwargs)
            path, i = "/".join(bn.path), count[0]
            count[0] += 1
            if len(order) < count[0]:
                order.append(path)
            a = weight(i, path)
            h = args[0].astype(jnp.float32)
            axes = tuple(range(h.ndim - 1))
            mean = h.mean(axes)
            var = jnp.maximum((h * h).mean(axes) - mean**2, 0.0)
            m0, v0 = bn.get_variable("batch_stats", "mean"), bn.get_variable("batch_stats", "var")
            m = a * mean + (1 - a) * m0
            v = a * (var + (mean - m) ** 2) + (1 - a) * (v0 + (m0 - m) ** 2)
            found[path] = (mean, var)
            out = (h - m) * lax.rsqrt(v + bn.epsilon) * bn.get_variable("params", "scale")
            return (out + bn.get_variable("params", "bias")).astype(args[0].dtype)

        with nn.intercept_methods(intercept):
            model.apply(variables, images, train=True, mutable=["batch_stats"])
        return found

    run_jit = jax.jit(run)
    sums: dict[str, list[np.ndarray]] = {}
    batches = 0
    for start in range(0, len(x) - batch + 1, batch):
        for path, (mean, var) in jax.device_get(run_jit(x[start:start + batch])).items():
            mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
            s = sums.setdefault(path, [0.0, 0.0])
            s[0], s[1] = s[0] + mean, s[1] + var + mean**2
        batches += 1
    stats = flatten(variables["batch_stats"])
    new = dict(stats)
    # jit returns ``found`` with its keys sorted (blocks_0, blocks_1, blocks_10, ..., stem): the
    # share is looked up by the call-order index the pass used, never by the dict's order.
    for path, (s1, s2) in sums.items():
        a = weight(order.index(path), path)
        mean = s1 / batches
        var = np.maximum(s2 / batches - mean**2, 0.0)
        m0 = np.asarray(stats[f"{path}/mean"], np.float64)
        v0 = np.asarray(stats[f"{path}/var"], np.float64)
        m = a * mean + (1 - a) * m0
        new[f"{path}/mean"] = jnp.asarray(m, jnp.float32)
        new[f"{path}/var"] = jnp.asarray(
            a * (var + (mean - m) ** 2) + (1 - a) * (v0 + (m0 - m) ** 2), jnp.float32)
    return unflatten(new)


def probe(features, variables, data) -> float:
    """Test accuracy of a logistic regression on standardised pooled features."""
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, yte = data
    ftr, fte = np.asarray(features(variables, xtr)), np.asarray(features(variables, xte))
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=3000).fit((ftr - mu) / sd, ytr)
    return float(clf.score((fte - mu) / sd, yte))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("digits", "cifar", "cifar-gray"), default="digits")
    parser.add_argument("--contrast", type=float, default=1.0,
                        help="pixel values x become 128 + C (x - 128) (default 1: unchanged)")
    parser.add_argument("--cifar", default=str(SHARED_DATA / "cifar10"))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=0,
                        help="training images per class (0: all digits, 150 CIFAR)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--tiny", action="store_true",
                        help="20 digits a class at 32 px, two variants: checks that it runs")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    if args.tiny:
        args.data, args.resolution, args.per_class = "digits", 32, 20
        variants = {k: variants[k] for k in list(variants)[:2]}
    base = kfor1.load_pretrained("efficientnet_lite0")
    params = {k: v for k, v in base.variables["params"].items() if k != "head"}
    model = base.model.clone(num_classes=0, dropout_rate=0.0, drop_path_rate=0.0)
    features = jax.jit(lambda v, x: model.apply(v, x, train=False))
    data = load_data(args.data, args.resolution, args.per_class, args.cifar,
                     base.preprocessing.normalize, args.contrast)
    batch = min(200, len(data[0]))
    imagenet = {"params": params, "batch_stats": base.variables["batch_stats"]}
    rows = [("ImageNet's statistics (logits alone)", probe(features, imagenet, data))]
    for name, weight in variants.items():
        stats = estimate(model, imagenet, data[0], weight, batch)
        rows.append((name, probe(features, {"params": params, "batch_stats": stats}, data)))
    print(f"\nEfficientNet-Lite0, {args.data} at {args.resolution} px, contrast {args.contrast:g}, "
          f"{len(data[1])} train / "
          f"{len(data[3])} test images; converged linear probe on pooled features\n")
    print("| BatchNorm statistics | probe test accuracy |\n|---|---:|")
    for name, accuracy in rows:
        print(f"| {name} | {100 * accuracy:.1f}% |")
    write_json(args.json, [{"variant": n, "accuracy": a, "data": args.data,
                            "resolution": args.resolution, "contrast": args.contrast}
                           for n, a in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
