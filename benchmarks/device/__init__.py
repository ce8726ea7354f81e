"""The prepared check for a lent accelerator: ``benchmarks/device_check.sh`` runs ``check`` (JAX
on the device, the CPU-only paths off, a K-task step equal to K single-task steps), then the suite.
"""
