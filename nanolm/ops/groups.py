"""Communicators by name. A registered op's schema holds tensors and scalars, not Python objects,
so the ops that talk to a tensor-parallel group (the vocab-parallel loss, the collectives of
nanolm/tensor_parallel.py) take the name its communicator (nanolm/dist.py) is registered under."""
_COMMUNICATORS = {}


def register(comm):
    """comm's name, for the ops to find it by: its group's description and this rank's place in
    it (the rank tells apart the ranks a test runs as threads of one process)."""
    name = f"{comm.env.group or 'world'}:{comm.env.rank}"
    _COMMUNICATORS[name] = comm
    return name


def communicator(name):
    return _COMMUNICATORS[name]
