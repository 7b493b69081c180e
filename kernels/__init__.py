"""nanolm's Triton kernels, imported as `nanolm.kernels` (see setup.py for why).

One file per op: the @triton.jit kernels first, then the launchers (shapes, allocation, block
sizes, warps). They trust their inputs and import nothing from nanolm: the Triton backend
(each op's module in nanolm/ops/) checks every tensor against its support row, then calls them.
"""
