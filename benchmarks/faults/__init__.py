"""Fault benchmarks (``python -m benchmarks.faults``): ``matrix`` throws faults at ``kfor1 train``
and counts clean errors, exact resumes, silent results and lost files.
"""
