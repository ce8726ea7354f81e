"""Serving benchmarks (``python -m benchmarks.serving``): ``mixed_batch`` times a mixed-task batch
in one ``PatchServer`` call against the single-task model and K separate models.
"""
