"""Where the time goes (``python -m benchmarks.profiles``): ``hlo`` times kfor1's compiled ops by
kind, ``torch_ops`` sorts PyTorch's ATen ops into the same kinds.
"""
