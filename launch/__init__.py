"""Entry points runnable as ``python -m launch.<name>`` from a source checkout."""
