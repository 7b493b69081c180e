"""nanolm's Triton kernels, imported as `nanolm.kernels` (see setup.py for why).

One file per op: the @triton.jit kernels first, then the launchers the Triton backend
(nanolm/backends/triton.py) re-exports with the backend signatures of nanolm/backends/torch_ref.py.
"""
