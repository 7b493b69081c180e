"""Data-parallel training on raw NCCL collectives (GPU) or torch.distributed gloo (CPU tests).

Which bytes move when, for one optimizer step on W ranks with P parameters (fp32 grads):
  start          rank 0's parameters are broadcast once, so every rank starts identical.
  data parallel  every rank all-reduces (averages) the whole flat gradient buffer, in buckets of
                 ~25 MB launched during the last micro-step's backward as soon as each bucket's
                 gradients are final, so communication overlaps the rest of the backward.
                 Bus traffic per rank: 2·(W-1)/W · 4P bytes. All-reduce leaves bit-identical
                 gradients on every rank, so every rank takes the same AdamW step on its own copy.
  ZeRO-1         each bucket is reduce-scattered instead: rank r receives the averaged gradients
                 of its 1/W piece of every bucket, updates only those pieces of the fp32 weights
                 and AdamW moments (optimizer memory / W), then the updated pieces are
                 all-gathered. (W-1)/W · 4P bytes each way: the same bus traffic as all-reduce.

Flat-buffer geometry: the optimizer pads its buffers to a multiple of W; buckets are cut from
the END of the buffer (the backward produces the last layers' gradients first) with boundaries
at multiples of W, so each bucket splits into W equal pieces, and rank r owns piece r of every
bucket. The NCCL in-place forms then need no copies: reduce-scatter writes piece r of the
bucket, all-gather reads it from there.

NCCL is called through ctypes on the same libnccl.so.2 that torch has already loaded: a second
copy of NCCL in one process (e.g. linked into nanolm._C) is a known source of hangs and symbol
clashes, and ctypes keeps every call, with its bytes and stream, visible in this one file.
Collectives run on a dedicated communication stream ordered against the compute stream by CUDA
events, so the host never blocks on them. A watchdog thread polls ncclCommGetAsyncError and the
pending collectives; if one outlives the timeout or NCCL reports an error (a peer died), it
aborts the communicator and exits non-zero naming the rank and the collective, so a dead or
hung peer never hangs the others forever.

Tensor parallel (nanolm/tensor_parallel.py) lays the world out as tp x dp (layout_groups): each
tp group is tp consecutive ranks (one node), each dp group the ranks holding the same model
slice. `split` builds a communicator per group from the same bootstrap store (NCCL: one more
ncclCommInitRank per group, its unique id published under the group's key; gloo: new_group);
data parallel and ZeRO-1 then run over the dp group exactly as above, and the model's
activation all-reduces over the tp group, each on its own stream.

On CPU the same interface runs on torch.distributed's gloo backend (GlooComm), so CI runs real
multi-process data parallel, ZeRO-1 and tensor parallel. Every collective returns a handle; `comm.wait(handle)`
orders the caller after it (a stream wait on NCCL, a host wait on gloo).
"""
import ctypes
import datetime
import glob
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: str = ""  # "" for all ranks; else which group this rank and world_size are within

    @property
    def is_main(self):
        return self.rank == 0


def env_from_torchrun():
    """Rank, world size and local rank from torchrun's environment (1 process if absent)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def rendezvous_store(env, timeout_s):
    """The TCPStore the ranks meet in. Under torchrun the elastic agent already hosts one on
    MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True): connect to it as a client rather than
    binding the port a second time, under a prefix per restart attempt so a restarted group
    never reads the previous attempt's keys. Without the agent, rank 0 hosts it."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = tdist.TCPStore(host, port, env.world_size, is_master=env.is_main and not agent_hosts,
                           timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"nanolm/attempt_{attempt}", store)


def describe(env):
    within = f" of the {env.group} group" if env.group else ""
    return f"rank {env.rank}/{env.world_size}{within}"


def fail(env, what, waiting_for=""):
    """A collective failed or timed out: say which rank and which collective, and what the ranks
    were waiting for if the training loop said (Context.waiting_for), and exit at once.
    os._exit rather than an exception: unwinding would run the communicator's and the process
    group's teardown, which can block on the very peer that is gone."""
    why = f" while waiting for {waiting_for}" if waiting_for else ""
    print(f"nanolm.dist: {describe(env)}: {what}{why}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


# ----------------------------------------------------------------------------- NCCL via ctypes

NCCL_SUCCESS, NCCL_IN_PROGRESS = 0, 7                      # ncclResult_t
NCCL_SUM, NCCL_AVG = 0, 4                                  # ncclRedOp_t
NCCL_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,   # ncclDataType_t
               torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9}


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]  # NCCL_UNIQUE_ID_BYTES


class NcclConfig(ctypes.Structure):
    """ncclConfig_t as introduced in NCCL 2.14: {size, magic, version, blocking}. Later releases
    append fields; NCCL copies min(size, its sizeof) bytes over its NCCL_CONFIG_INITIALIZER and
    resets every field newer than `version` to its default, so this prefix with version 2.14
    stays valid (and the 4 padding bytes after `blocking` are ignored)."""
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int)]


NCCL_CONFIG_MAGIC = 0xCAFEBEEF
NCCL_CONFIG_VERSION = 21400  # NCCL_VERSION(2, 14, 0) = 2*10000 + 14*100 + 0


def load_libnccl():
    """The libnccl.so.2 torch uses: once CUDA is initialised it is loaded, and dlopen by soname
    returns that copy; else the one in the nvidia-nccl wheel torch depends on."""
    torch.cuda.init()
    candidates = ["libnccl.so.2"]
    for path in sys.path:
        candidates += glob.glob(os.path.join(path, "nvidia", "nccl*", "lib", "libnccl.so.2"))
    for name in candidates:
        try:
            return _declare(ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL))
        except OSError:
            continue
    raise RuntimeError("libnccl.so.2 not found: install torch's CUDA build (it ships NCCL)")


def _declare(lib):
    """C signatures from nccl.h: without them ctypes would pass size_t and pointers as int."""
    p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs = {"ncclGetVersion": [ctypes.POINTER(i)],
            "ncclGetUniqueId": [ctypes.POINTER(NcclUniqueId)],
            "ncclCommInitRankConfig": [ctypes.POINTER(p), i, NcclUniqueId, i, ctypes.POINTER(NcclConfig)],
            "ncclCommGetAsyncError": [p, ctypes.POINTER(i)],
            "ncclAllReduce": [p, p, z, i, i, p, p],       # send, recv, count, dtype, op, comm, stream
            "ncclReduceScatter": [p, p, z, i, i, p, p],   # count = elements received per rank
            "ncclAllGather": [p, p, z, i, p, p],          # count = elements sent per rank
            "ncclBroadcast": [p, p, z, i, i, p, p],       # ..., dtype, root, comm, stream
            "ncclCommFinalize": [p], "ncclCommDestroy": [p], "ncclCommAbort": [p]}
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i
    lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [i], ctypes.c_char_p
    lib.ncclGetLastError.argtypes, lib.ncclGetLastError.restype = [p], ctypes.c_char_p
    return lib


def ptr(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


class NcclComm:
    """One non-blocking NCCL communicator per process and group, with its own CUDA stream.
    `env` gives this rank's place in the group; the group's rank 0 publishes the unique id
    under `key` in the store."""

    def __init__(self, env, store, timeout_s=300.0, key="nccl_unique_id"):
        self.env, self.store, self.timeout_s, self.waiting_for = env, store, timeout_s, ""
        self.device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(self.device)  # before NCCL: the communicator binds the current device
        self.lib = load_libnccl()
        version = ctypes.c_int()
        self.lib.ncclGetVersion(ctypes.byref(version))
        self.version = version.value
        self.stream = torch.cuda.Stream(self.device)
        self.comm = ctypes.c_void_p()
        unique_id = NcclUniqueId()
        if env.is_main:
            self._check(self.lib.ncclGetUniqueId(ctypes.byref(unique_id)), "ncclGetUniqueId")
            store.set(key, bytes(unique_id))
        else:
            ctypes.memmove(ctypes.byref(unique_id), store.get(key), ctypes.sizeof(unique_id))
        config = NcclConfig(ctypes.sizeof(NcclConfig), NCCL_CONFIG_MAGIC, NCCL_CONFIG_VERSION, 0)
        self._enqueue("ncclCommInitRankConfig", self.lib.ncclCommInitRankConfig(
            ctypes.byref(self.comm), env.world_size, unique_id, env.rank, ctypes.byref(config)))
        self.watchdog = Watchdog(self)

    # -- errors and progress
    def _message(self, result):
        last = self.lib.ncclGetLastError(self.comm) if self.comm else None
        return f"{self.lib.ncclGetErrorString(result).decode()} ({(last or b'').decode()})"

    def _check(self, result, what):
        if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            fail(self.env, f"{what} failed: {self._message(result)}", self.waiting_for)

    def async_error(self):
        state = ctypes.c_int()
        self.lib.ncclCommGetAsyncError(self.comm, ctypes.byref(state))
        return state.value

    def _enqueue(self, what, result):
        """A non-blocking communicator may answer ncclInProgress: the call is complete (for a
        collective: enqueued on the stream) only once the async error leaves that state, and
        no other NCCL call may be made on the communicator before."""
        self._check(result, what)
        deadline = time.monotonic() + self.timeout_s
        while (state := self.async_error()) == NCCL_IN_PROGRESS:
            if time.monotonic() > deadline:
                self.abort_and_exit(f"{what} did not complete in {self.timeout_s:g} s")
            time.sleep(0.0005)
        self._check(state, what)

    # -- collectives: enqueued on self.stream once the caller's stream reaches this point
    def _launch(self, name, fn, *args, tensors):
        for t in tensors:
            if t.device != self.device or not t.is_contiguous() or t.dtype not in NCCL_DTYPES:
                raise ValueError(f"{name}: needs contiguous tensors on {self.device} of a NCCL dtype, "
                                 f"got {t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._enqueue(name, fn(*args, self.comm, ctypes.c_void_p(self.stream.cuda_stream)))
        done = torch.cuda.Event()
        done.record(self.stream)
        for t in tensors:  # keep the caching allocator from reusing them while NCCL runs
            t.record_stream(self.stream)
        self.watchdog.watch(done, name)
        return done

    def all_reduce(self, tensor, average=True):
        return self._launch("ncclAllReduce", self.lib.ncclAllReduce, ptr(tensor), ptr(tensor),
                            tensor.numel(), NCCL_DTYPES[tensor.dtype], NCCL_AVG if average else NCCL_SUM,
                            tensors=[tensor])

    def reduce_scatter(self, output, input, average=True):
        """output (n,) receives the reduced rank-th slice of input (W·n,); in place when output
        is that slice of input."""
        return self._launch("ncclReduceScatter", self.lib.ncclReduceScatter, ptr(input), ptr(output),
                            output.numel(), NCCL_DTYPES[input.dtype], NCCL_AVG if average else NCCL_SUM,
                            tensors=[output, input])

    def all_gather(self, output, input):
        """output (W·n,) receives every rank's input (n,), in rank order; in place when input
        is output's rank-th slice."""
        return self._launch("ncclAllGather", self.lib.ncclAllGather, ptr(input), ptr(output),
                            input.numel(), NCCL_DTYPES[input.dtype], tensors=[output, input])

    def broadcast(self, tensor, root=0):
        return self._launch("ncclBroadcast", self.lib.ncclBroadcast, ptr(tensor), ptr(tensor),
                            tensor.numel(), NCCL_DTYPES[tensor.dtype], root, tensors=[tensor])

    def wait(self, done):
        """Order the caller's stream after a collective (the host does not block)."""
        torch.cuda.current_stream(self.device).wait_event(done)

    def split(self, groups, kind):
        """This rank's communicator among `groups` (lists of global ranks partitioning the
        world): a new NCCL communicator from the same bootstrap store. Every rank calls it
        with the same groups, and only builds its own group's communicator."""
        ranks = next(g for g in groups if self.env.rank in g)
        env = DistEnv(ranks.index(self.env.rank), len(ranks), self.env.local_rank, f"{kind} {ranks}")
        return NcclComm(env, self.store, self.timeout_s, key=f"nccl_unique_id/{kind}/{ranks[0]}")

    # -- teardown
    def abort(self):
        if self.comm:
            self.lib.ncclCommAbort(self.comm)
            self.comm = ctypes.c_void_p()

    def abort_and_exit(self, what):
        """Report, abort the communicator (so NCCL's kernels and proxy threads stop) and exit.
        The abort gets a few seconds: it frees device memory, which waits for the device, and
        a wedged kernel must not keep the process alive."""
        print(f"nanolm.dist: {describe(self.env)}: {what}; aborting the "
              "communicator", file=sys.stderr, flush=True)
        aborter = threading.Thread(target=self.abort, daemon=True)
        aborter.start()
        aborter.join(5.0)
        fail(self.env, what, self.waiting_for)

    def close(self):
        if self.comm:
            self.watchdog.stop()
            self.stream.synchronize()
            self._enqueue("ncclCommFinalize", self.lib.ncclCommFinalize(self.comm))
            self._check(self.lib.ncclCommDestroy(self.comm), "ncclCommDestroy")
            self.comm = ctypes.c_void_p()


class Watchdog(threading.Thread):
    """Aborts the communicator and exits if a collective outlives the timeout or NCCL reports
    an asynchronous error (a peer died, the network failed)."""

    def __init__(self, comm, poll_s=0.05):
        super().__init__(daemon=True, name="nanolm-nccl-watchdog")
        self.comm, self.poll_s, self.pending, self.lock = comm, poll_s, [], threading.Lock()
        self.stopped = threading.Event()
        self.start()

    def watch(self, event, name):
        with self.lock:
            self.pending.append((event, name, time.monotonic() + self.comm.timeout_s))

    def stop(self):
        self.stopped.set()

    def run(self):
        while not self.stopped.wait(self.poll_s):
            with self.lock:
                self.pending = [p for p in self.pending if not p[0].query()]
                oldest = self.pending[0] if self.pending else None
            error = self.comm.async_error() if self.comm.comm else NCCL_SUCCESS
            late = oldest is not None and time.monotonic() > oldest[2]
            if late or error not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                name = oldest[1] if oldest else "the communicator"
                self.comm.abort_and_exit(f"{name} timed out after {self.comm.timeout_s:g} s" if late else
                                         f"{name}: NCCL reported {self.comm._message(error)}")


# ----------------------------------------------------------------------------- gloo (CPU)

# torch >= 2.10 names the flat-tensor collectives *_single; older releases only have the others
_all_gather_flat = getattr(tdist, "all_gather_single", tdist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(tdist, "reduce_scatter_single", tdist.reduce_scatter_tensor)


@dataclass
class GlooWork:
    name: str
    work: object
    scale: object = None  # the tensor to divide by world size once done (gloo has no AVG)


class GlooComm:
    """The NcclComm interface on torch.distributed gloo, for CPU runs and tests. Collectives
    run asynchronously on gloo's threads; `wait` blocks the host until one is done. Built with
    a store it is the world's group; `split` makes sub-groups (group = their process group)."""

    def __init__(self, env, store, timeout_s=300.0, group=None):
        self.env, self.timeout_s, self.device, self.group = env, timeout_s, torch.device("cpu"), group
        self.waiting_for, self.is_world = "", group is None
        if self.is_world:
            tdist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world_size,
                                     timeout=datetime.timedelta(seconds=timeout_s))

    def split(self, groups, kind):
        """As NcclComm.split. torch.distributed needs every rank to create every group, in
        the same order; this rank keeps its own."""
        mine = None
        for ranks in groups:
            pg = tdist.new_group(ranks, timeout=datetime.timedelta(seconds=self.timeout_s))
            if self.env.rank in ranks:
                env = DistEnv(ranks.index(self.env.rank), len(ranks), self.env.local_rank, f"{kind} {ranks}")
                mine = GlooComm(env, None, self.timeout_s, group=pg)
        return mine

    def _start(self, name, launch, scale=None):
        try:
            return GlooWork(name, launch(), scale)
        except RuntimeError as e:
            fail(self.env, f"{name} failed: {e}", self.waiting_for)

    def all_reduce(self, tensor, average=True):
        return self._start("all_reduce", lambda: tdist.all_reduce(tensor, group=self.group, async_op=True),
                           tensor if average else None)

    def reduce_scatter(self, output, input, average=True):
        return self._start("reduce_scatter", lambda: _reduce_scatter_flat(output, input, group=self.group,
                                                                          async_op=True),
                           output if average else None)

    def all_gather(self, output, input):
        return self._start("all_gather", lambda: _all_gather_flat(output, input, group=self.group,
                                                                  async_op=True))

    def broadcast(self, tensor, root=0):
        """root: the rank within this group."""
        return self._start("broadcast", lambda: tdist.broadcast(tensor, group=self.group, group_src=root,
                                                                async_op=True))

    def wait(self, handle):
        try:
            handle.work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:  # a peer died (connection closed) or the timeout passed
            fail(self.env, f"{handle.name} failed (timeout {self.timeout_s:g} s): {e}", self.waiting_for)
        if handle.scale is not None:
            handle.scale.div_(self.env.world_size)

    def close(self):
        """Shut the group down now, on this thread. destroy_process_group() stops the world's
        gloo threads, but a sub-group's keep running while anything holds its handle, and the
        model and optimizer hold this object: left to interpreter exit, their teardown races
        Python's finalisation and can abort the process ('terminate called without an active
        exception'). So every GlooComm drops its handle here, after the group is shut down."""
        if self.is_world:  # destroys the sub-groups too
            tdist.destroy_process_group()
        self.group = None


def init(env, device, timeout_s=300.0):
    """The communicator for this process: NCCL on CUDA, gloo on CPU; None for one process."""
    if env.world_size == 1:
        return None
    store = rendezvous_store(env, timeout_s)
    return (NcclComm if device.type == "cuda" else GlooComm)(env, store, timeout_s)


# ----------------------------------------------------------------------------- buckets

@dataclass
class Bucket:
    start: int           # [start, end) of the flat gradient buffer; both multiples of world size
    end: int
    params: int          # how many parameters overlap it (to re-arm `waiting`)
    waiting: int = 0     # of those, how many have no final gradient yet in this backward
    handle: object = None  # the launched collective, None until launched


def make_buckets(views, total, bucket_elems, world_size, cuts=()):
    """Split [0, total) into ranges of about bucket_elems, cut from the END of the flat buffer
    because the backward produces the last layers' gradients first. Boundaries are multiples
    of world_size so each bucket reduce-scatters into equal pieces. `views` lists (offset,
    numel) of the parameters in the buffer. `cuts`: offsets no bucket may cross (rounded down
    to a multiple of world_size). Returns the buckets in launch order."""
    if total % world_size:
        raise ValueError(f"flat buffer of {total} elements is not padded to a multiple of {world_size}")
    step = max(world_size, bucket_elems // world_size * world_size)
    edges = sorted({0, total} | {c // world_size * world_size for c in cuts if 0 < c < total})
    buckets = []
    for lo, end in reversed(list(zip(edges, edges[1:]))):
        while end > lo:
            start = max(lo, end - step)
            overlapping = sum(1 for off, n in views if off < end and off + n > start)
            buckets.append(Bucket(start, end, overlapping))
            end = start
    return buckets


def piece(bucket, rank, world_size):
    """[start, end) of rank's 1/world_size of a bucket: what it owns under ZeRO-1."""
    n = (bucket.end - bucket.start) // world_size
    return bucket.start + rank * n, bucket.start + (rank + 1) * n


class GradReducer:
    """Averages (or, for ZeRO-1, reduce-scatters) the optimizer's flat gradient buffer across
    ranks one bucket at a time, launched from post-accumulate-grad hooks as soon as every
    parameter overlapping a bucket has its final gradient. Armed only for the last micro-step
    of a gradient-accumulation cycle; earlier micro-steps accumulate locally with no traffic.
    The hooks fire in the autograd engine's order, which is the same on every rank (same
    graph), so every rank launches the buckets in the same order, as NCCL requires."""

    def __init__(self, comm, opt, bucket_bytes, zero):
        self.comm, self.grads, self.zero = comm, opt.flat_grad, zero
        # [0, whole) needs the whole averaged gradient on every rank even under ZeRO-1 (FlatMuon's
        # matrices: Newton-Schulz takes whole matrices), so its buckets are all-reduced
        self.whole = opt.leading_numel
        env = comm.env
        views = [(off, n) for _, off, n in opt.layout]
        # The 1-D parameters (after the decayed 2-D ones) include layer 0's LayerNorms, complete
        # only at the very end of the backward: a bucket of their own keeps them from holding
        # back the last layers' weights, which are ready first.
        self.buckets = make_buckets(views, self.grads.numel(), bucket_bytes // self.grads.element_size(),
                                    env.world_size, cuts=[opt.decay_numel, opt.leading_numel])
        self.pieces = [piece(b, env.rank, env.world_size) for b in self.buckets]
        self.armed = False
        for param, (off, n) in zip(opt.params, views):
            mine = [b for b in self.buckets if off < b.end and off + n > b.start]
            param.register_post_accumulate_grad_hook(lambda _, mine=mine: self._ready(mine))

    def arm(self):
        """Call before the backward whose gradients are the step's final ones."""
        for b in self.buckets:
            b.waiting, b.handle = b.params, None
        self.armed = True

    def _ready(self, buckets):
        if not self.armed:
            return
        for b in buckets:
            b.waiting -= 1
            if b.waiting == 0:
                b.handle = self._launch(b)

    def _launch(self, b):
        full = self.grads[b.start:b.end]
        if not self.zero or b.start < self.whole:
            return self.comm.all_reduce(full)
        start, end = piece(b, self.comm.env.rank, self.comm.env.world_size)
        return self.comm.reduce_scatter(self.grads[start:end], full)

    def finish(self):
        """After the backward: order the caller after every bucket's collective. A bucket never
        launched means a parameter got no gradient, which would deadlock the other ranks."""
        missing = [(b.start, b.end) for b in self.buckets if b.handle is None]
        if missing:
            raise RuntimeError(f"gradient buckets never completed {missing}: some parameters "
                               "received no gradient in the backward (unused parameters?)")
        for b in self.buckets:
            self.comm.wait(b.handle)
        self.armed = False


def data_parallel(comm, opt, bucket_mb, zero):
    """Make rank 0's weights everyone's, shard the optimizer for ZeRO-1, and return the
    GradReducer that the training step arms and finishes."""
    comm.wait(comm.broadcast(opt.flat_param, root=0))
    opt.data_parallel(comm)
    reducer = GradReducer(comm, opt, int(bucket_mb * 2**20), zero)
    if zero:
        opt.shard(comm, [((b.start, b.end), p) for b, p in zip(reducer.buckets, reducer.pieces)])
    return reducer


def layout_groups(world_size, tp):
    """The 2-D layout world = tp x dp: global rank = dp_rank * tp + tp_rank, so each
    tensor-parallel group is `tp` consecutive ranks (one node, under torchrun's numbering)
    and each data-parallel group takes the ranks with the same tp_rank across them.
    Returns (tp groups, dp groups) as lists of global ranks."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"tp={tp} does not divide the world size {world_size}")
    dp = world_size // tp
    return ([[d * tp + t for t in range(tp)] for d in range(dp)],
            [[d * tp + t for d in range(dp)] for t in range(tp)])


class Context:
    """What the training loop needs from the other ranks. With one process every method is a
    no-op, so the single-GPU loop is the same code.

    With tp > 1 the world is laid out tp x dp (layout_groups): `tp_comm` links the ranks that
    share one model (its tensor-parallel slices), `dp_comm` the ranks holding the same slice,
    which average gradients (ZeRO-1 shards over them). Either is None when its group has one
    rank; `comm` spans the world."""

    def __init__(self, env, device, timeout_s=300.0, tp=1):
        tp_groups, dp_groups = layout_groups(env.world_size, tp)
        self.env, self.device, self.reducer = env, device, None
        self.tp, self.dp = tp, env.world_size // tp
        self.tp_rank, self.dp_rank = env.rank % tp, env.rank // tp
        self.comm = init(env, device, timeout_s)
        self.tp_comm = self.dp_comm = None
        if 1 < tp < env.world_size:
            self.tp_comm, self.dp_comm = self.comm.split(tp_groups, "tp"), self.comm.split(dp_groups, "dp")
        elif tp == env.world_size:
            self.tp_comm = self.comm
        else:
            self.dp_comm = self.comm

    @property
    def is_main(self):
        return self.env.is_main

    def attach(self, opt, bucket_mb=25.0, zero=0):
        """Data parallel over opt's flat buffers (see data_parallel), within the dp group;
        the optimizer's gradient norm also sums over the tp group."""
        if self.tp_comm is not None:
            opt.tensor_parallel(self.tp_comm)
        if self.dp_comm is not None:
            self.reducer = data_parallel(self.dp_comm, opt, bucket_mb, zero)

    def arm(self):
        if self.reducer is not None:
            self.reducer.arm()

    def finish(self):
        if self.reducer is not None:
            self.reducer.finish()

    def mean(self, value):
        """The average of a float over the ranks (for logging)."""
        if self.comm is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.comm.wait(self.comm.all_reduce(t))
        return t.item()

    def waiting_for(self, what):
        """Name what the next collectives may wait on beyond the other ranks' own work (e.g.
        rank 0 writing a checkpoint), for the error if they time out; "" clears it."""
        for comm in (self.comm, self.tp_comm, self.dp_comm):
            if comm is not None:
                comm.waiting_for = what

    def any(self, flag):
        """True on every rank if it is True on any (e.g. a Ctrl-C seen by some ranks only)."""
        return self.mean(float(flag)) > 0 if self.comm is not None else flag

    def close(self):
        for sub in (self.tp_comm, self.dp_comm):
            if sub is not None and sub is not self.comm:
                sub.close()
        if self.comm is not None:
            self.comm.close()
        self.comm = self.tp_comm = self.dp_comm = None
