"""nanolm: a minimal GPT trainer whose hot path runs on hand-written kernels.

Flow: train.py -> model.py / optim.py -> nanolm/ops/ (one module per hot op: its specification,
checks, torch.library registration and every backend's launchers) -> the kernels (kernels/,
csrc/).
"""
__version__ = "0.1.0"
