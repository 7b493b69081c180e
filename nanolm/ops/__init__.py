"""The hot ops, one module each: the specification, the checks, the torch.library registration
(namespace `nanolm`) and every backend's support row and launchers of one op read top to bottom
in its module. Shared by them: support.py (the support row and generic tensor checks), dropout.py
(the Dropout argument and the mask's specification), launch.py (how a C++ launcher is called),
groups.py (communicators by name). backends.py chooses a backend per op (`--kernels`).

To add an op: see "Add a fused op" in README.md (tests/test_op_checklist.py enforces it).
"""
from nanolm.ops import adamw, attention, cross_entropy, layernorm, mlp_activation, rope

# op -> its module; every module has BACKENDS = {backend name: <Op>Backend(support, *functions)}
OPS = {"layernorm": layernorm, "attention": attention, "cross_entropy": cross_entropy, "adamw": adamw,
       "rope": rope, "mlp_activation": mlp_activation}


def functions(op):
    """The names of the functions every backend of op implements, in order (the specification's)."""
    return next(iter(OPS[op].BACKENDS.values()))._fields[1:]
