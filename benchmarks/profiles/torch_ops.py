"""Where PyTorch's time goes, in the kinds of ``benchmarks/profiles/hlo.py``, for a side-by-side.

A ratio of images/s says that kfor1 is slower or faster than PyTorch; it does not say where.
This profiles the suite's PyTorch workloads (the same network, weights, batch and the fastest
eager form: channels_last, padding in the convolution, frozen ``requires_grad=False``, fused
AdamW) with ``torch.profiler`` and sorts each ATen op's *self* time (its own time, without the
ops it calls, so that ``conv2d -> convolution -> mkldnn_convolution`` counts once) into the
kinds kfor1's HLO is sorted into:

- ``matrix products``: convolutions whose kernel is not depthwise, and ``mm``/``addmm``;
- ``depthwise``: convolutions (and their backward) with a ``(C, 1, k, k)`` kernel;
- ``BatchNorm sums``: ``native_batch_norm`` and its backward (PyTorch's BatchNorm is one op that
  reduces and normalises, where XLA splits sums from the elementwise normalisation);
- ``elementwise``: activations, adds, the loss and the optimizer's update;
- ``data movement``: copies, layout changes, padding, concatenation;
- ``other``: the rest (allocation, views, autograd bookkeeping).

On the CPU an ATen op runs on the calling thread, with its own intra-op threads, so the self
times add up to about the step's wall time plus the profiler's own per-op overhead (10-30% more
than the suite's timing of the same step, in ``benchmarks/README.md``). kfor1's op times can add
up to more than its wall time: XLA:CPU runs independent ops concurrently.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from torch.profiler import ProfilerActivity, profile

CONVOLUTIONS = ("conv", "mkldnn_convolution", "_convolution", "convolution_backward",
                "_nnpack_spatial_convolution", "thnn_conv", "slow_conv")
PRODUCTS = ("mm", "addmm", "bmm", "matmul", "linear", "_addmm_activation")
BATCHNORM = ("batch_norm", "native_batch_norm", "native_batch_norm_backward",
             "_batch_norm_impl_index", "_native_batch_norm_legit",
             "_native_batch_norm_legit_no_training", "batch_norm_backward",
             "_batch_norm_with_update", "cudnn_batch_norm", "miopen_batch_norm")
MOVEMENT = ("copy_", "contiguous", "clone", "to", "_to_copy", "cat", "pad", "constant_pad_nd",
            "permute", "transpose", "t", "reshape", "view", "flatten", "expand", "as_strided",
            "empty_like", "zero_", "fill_", "zeros", "zeros_like", "_reshape_alias")
ELEMENTWISE = ("add", "add_", "mul", "mul_", "div", "div_", "sub", "relu", "relu_", "relu6",
               "hardtanh", "hardtanh_", "hardtanh_backward", "threshold_backward", "clamp",
               "clamp_", "silu", "sigmoid", "dropout", "log_softmax", "_log_softmax",
               "_log_softmax_backward_data", "nll_loss", "nll_loss_forward", "nll_loss_backward",
               "nll_loss_nd", "cross_entropy_loss", "mean", "sum", "adaptive_avg_pool2d",
               "_adaptive_avg_pool2d", "_adaptive_avg_pool2d_backward", "mean_backward",
               "lerp_", "addcmul_", "addcdiv_", "sqrt", "ones_like", "fill")


def _depthwise(shapes: list[Any]) -> bool:
    """Whether a convolution op's inputs hold a ``(C, 1, k, k)`` kernel with C > 1."""
    return any(isinstance(s, list) and len(s) == 4 and s[1] == 1 and s[0] > 1
               for s in shapes[:3])


def torch_kind(name: str, shapes: list[Any]) -> str:
    """The kind of an ATen op (``aten::name``), given its inputs' shapes."""
    op = name.removeprefix("aten::")
    if op.startswith(CONVOLUTIONS) or "convolution" in op:
        return "depthwise" if _depthwise(shapes) else "matrix products"
    if op in PRODUCTS:
        return "matrix products"
    if op in BATCHNORM or "batch_norm" in op:
        return "BatchNorm sums"
    if op in MOVEMENT:
        return "data movement"
    if op in ELEMENTWISE or "adamw" in op or op.startswith("_foreach"):
        return "elementwise"
    return "other"


def profile_torch_path(
    name: str, workload: Any, steps: int, kinds: Sequence[str]
) -> dict[str, Any]:
    """Milliseconds of self time per step, by kind and by op, over ``steps`` profiled steps.

    Args:
      name: the path's name (``inference``, ``patch step``, ``full step``).
      workload: a ``benchmarks.suite.bench.Workload`` of PyTorch (``Bench.torch_train`` or
        ``Bench.torch_infer``).
      steps: steps profiled, after two warm ones.
      kinds: every kind to report, zero where none was seen (``benchmarks.profiles.hlo.KINDS``).

    Returns:
      ``{"path", "op_us_per_step", "by_kind_us", "top_ops", "ops_seen"}`` as
      ``benchmarks.profiles.hlo.profile_path`` returns for kfor1.
    """
    for _ in range(2):
        workload.update(workload.run())
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            workload.update(workload.run())
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue  # Profiler annotations (optimizer step, autograd nodes) hold aten ops.
        kind = torch_kind(event.name, list(event.input_shapes or []))
        us = float(event.self_cpu_time_total) / steps
        by_kind[kind] += us
        by_op[(event.name + (" (depthwise)" if kind == "depthwise" else ""), kind)] += us
    top = sorted(((us, op, kind) for (op, kind), us in by_op.items()), reverse=True)
    return {"path": name, "op_us_per_step": sum(by_kind.values()),
            "by_kind_us": {k: by_kind.get(k, 0.0) for k in kinds},
            "top_ops": [{"op": op, "kind": kind, "us": us} for us, op, kind in top[:12]],
            "ops_seen": len(by_op)}
