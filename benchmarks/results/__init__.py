"""What kfor1 finds on real data (``python -m benchmarks.results``): ``document`` regenerates
``docs/results.md``; ``adabn_layers`` asks which BatchNorm layers' statistics a task should own.
"""
