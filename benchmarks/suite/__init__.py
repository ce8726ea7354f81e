"""kfor1 against PyTorch (``python -m benchmarks.suite``): ``grid`` runs the cells and the summary
table, ``bench`` builds each cell's networks and workloads, ``sections`` measures one claim each,
``torch_lite`` and ``torch_mobilenet`` are the PyTorch networks (also the reference of
``tests/test_model_equivalence.py``); ``conv_impl`` and ``end_to_end`` are scripts of their own.
"""
