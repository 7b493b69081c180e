"""nanolm: a minimal GPT trainer whose hot path runs on hand-written kernels.

Flow: train.py -> model.py / optim.py -> ops.py (one autograd Function per hot op)
-> a backend in nanolm/backends/ (torch reference, triton, cuda, cpu) -> the kernels.
"""
__version__ = "0.1.0"
