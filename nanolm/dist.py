"""Data-parallel training on raw NCCL collectives (GPU) or torch.distributed gloo (CPU tests).

Which bytes move when, for one optimizer step on W ranks with P parameters (fp32 grads):
  data parallel  every rank all-reduces (averages) the whole flat gradient buffer, in buckets of
                 ~25 MB launched during the last micro-step's backward as soon as each bucket's
                 gradients are final, so communication overlaps the rest of the backward.
                 Bus traffic per rank: 2·(W-1)/W · 4P bytes.
  ZeRO-1         each bucket is reduce-scattered instead: rank r receives the averaged gradients
                 of its 1/W slice of every bucket, updates only that slice of the fp32 master
                 weights and AdamW moments (optimizer memory / W), then the updated parameters
                 are all-gathered. Same bus traffic as an all-reduce: (W-1)/W · 4P each way.

NCCL is called through ctypes on the same libnccl.so.2 that torch has already loaded: a second
copy of NCCL inside one process (e.g. linked into nanolm._C) is a known source of hangs and
symbol clashes, and ctypes keeps every call visible in this one file. Collectives run on a
dedicated communication stream ordered against the compute stream by CUDA events, so the host
never blocks on them; a watchdog thread polls ncclCommGetAsyncError and aborts the communicator
(exiting non-zero with the rank and collective named) if an operation outlives the timeout,
so a dead or hung peer never hangs the others forever.

On CPU the same interface is implemented with torch.distributed's gloo backend (GlooComm), so CI
runs real multi-process data parallel and ZeRO-1.
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
    binding the port a second time. Without the agent, rank 0 hosts it."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = tdist.TCPStore(host, port, env.world_size, is_master=env.is_main and not agent_hosts,
                           timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return tdist.PrefixStore("nanolm", store)


# ----------------------------------------------------------------------------- NCCL via ctypes

NCCL_SUCCESS, NCCL_IN_PROGRESS = 0, 7
NCCL_SUM, NCCL_AVG = 0, 4
NCCL_DTYPES = {torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
               torch.int32: 2, torch.int64: 4, torch.uint8: 1}


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


class NcclConfig(ctypes.Structure):
    """The leading fields of ncclConfig_t as of NCCL 2.14. The struct is versioned and
    append-only: NCCL copies `size` bytes and gives every later field its default."""
    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int)]


def load_libnccl():
    """The libnccl.so.2 torch uses: already loaded once CUDA is initialised, else found in the
    nvidia-nccl wheel torch depends on."""
    torch.cuda.init()
    candidates = ["libnccl.so.2"]
    for path in sys.path:
        candidates += glob.glob(os.path.join(path, "nvidia", "nccl*", "lib", "libnccl.so.2"))
    for name in candidates:
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise RuntimeError("libnccl.so.2 not found: install torch's CUDA build (it ships NCCL)")


class NcclComm:
    """One NCCL communicator (one per process) with its own CUDA stream."""

    def __init__(self, env, store, timeout_s=300.0):
        self.lib = load_libnccl()
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclGetLastError.restype = ctypes.c_char_p
        self.env, self.timeout_s = env, timeout_s
        self.device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        unique_id = NcclUniqueId()
        if env.is_main:
            self._check(self.lib.ncclGetUniqueId(ctypes.byref(unique_id)), "ncclGetUniqueId")
            store.set("nccl_unique_id", bytes(unique_id.internal))
        else:
            ctypes.memmove(unique_id.internal, store.get("nccl_unique_id"), 128)
        self.comm = ctypes.c_void_p()
        config = NcclConfig(ctypes.sizeof(NcclConfig), 0xCAFEBEEF, 21400, 0)  # blocking = 0
        result = self.lib.ncclCommInitRankConfig(ctypes.byref(self.comm), env.world_size, unique_id,
                                                 env.rank, ctypes.byref(config))
        self._check_or_progress(result, "ncclCommInitRankConfig")
        self._wait_ready("ncclCommInitRankConfig")
        self.watchdog = Watchdog(self)

    # -- errors and progress
    def _message(self, result):
        last = self.lib.ncclGetLastError(self.comm) if self.comm else b""
        return f"{self.lib.ncclGetErrorString(result).decode()} ({(last or b'').decode()})"

    def _check(self, result, what):
        if result != NCCL_SUCCESS:
            raise RuntimeError(f"rank {self.env.rank}: {what} failed: {self._message(result)}")

    def _check_or_progress(self, result, what):
        if result not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            self._check(result, what)

    def async_error(self):
        state = ctypes.c_int()
        self._check(self.lib.ncclCommGetAsyncError(self.comm, ctypes.byref(state)), "ncclCommGetAsyncError")
        return state.value

    def _wait_ready(self, what):
        """A non-blocking communicator returns ncclInProgress until the call has been enqueued."""
        deadline = time.monotonic() + self.timeout_s
        while (state := self.async_error()) == NCCL_IN_PROGRESS:
            if time.monotonic() > deadline:
                self.abort()
                raise TimeoutError(f"rank {self.env.rank}: {what} did not complete in {self.timeout_s:.0f} s")
            time.sleep(0.001)
        self._check(state, what)

    # -- collectives: enqueued on self.stream after the caller's stream reaches this point
    def _launch(self, name, fn, *args, tensors):
        for t in tensors:
            if not t.is_cuda or not t.is_contiguous() or t.dtype not in NCCL_DTYPES:
                raise ValueError(f"{name}: needs contiguous CUDA tensors of a NCCL dtype, got {t.dtype} "
                                 f"on {t.device}")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._check_or_progress(fn(*args, self.comm, ctypes.c_void_p(self.stream.cuda_stream)), name)
        self._wait_ready(name)
        done = torch.cuda.Event()
        done.record(self.stream)
        for t in tensors:  # keep the caching allocator from reusing them while NCCL runs
            t.record_stream(self.stream)
        self.watchdog.watch(done, name)
        return done

    def all_reduce(self, tensor, average=True):
        return self._launch("ncclAllReduce", self.lib.ncclAllReduce, ptr(tensor), ptr(tensor),
                            ctypes.c_size_t(tensor.numel()), NCCL_DTYPES[tensor.dtype],
                            NCCL_AVG if average else NCCL_SUM, tensors=[tensor])

    def reduce_scatter(self, output, input, average=True):
        """output (n,) receives the reduced rank-th slice of input (W·n,)."""
        return self._launch("ncclReduceScatter", self.lib.ncclReduceScatter, ptr(input), ptr(output),
                            ctypes.c_size_t(output.numel()), NCCL_DTYPES[input.dtype],
                            NCCL_AVG if average else NCCL_SUM, tensors=[output, input])

    def all_gather(self, output, input):
        """output (W·n,) receives every rank's input (n,), in rank order."""
        return self._launch("ncclAllGather", self.lib.ncclAllGather, ptr(input), ptr(output),
                            ctypes.c_size_t(input.numel()), NCCL_DTYPES[input.dtype], tensors=[output, input])

    def broadcast(self, tensor, root=0):
        return self._launch("ncclBroadcast", self.lib.ncclBroadcast, ptr(tensor), ptr(tensor),
                            ctypes.c_size_t(tensor.numel()), NCCL_DTYPES[tensor.dtype], root,
                            tensors=[tensor])

    def wait(self, event):
        """Order the caller's stream after a collective (the host does not block)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def group(self):
        return _NcclGroup(self.lib)

    # -- teardown
    def abort(self):
        if self.comm:
            self.lib.ncclCommAbort(self.comm)
            self.comm = ctypes.c_void_p()

    def close(self):
        if self.comm:
            self.watchdog.stop()
            self.stream.synchronize()
            self._check_or_progress(self.lib.ncclCommFinalize(self.comm), "ncclCommFinalize")
            self._wait_ready("ncclCommFinalize")
            self._check(self.lib.ncclCommDestroy(self.comm), "ncclCommDestroy")
            self.comm = ctypes.c_void_p()


class _NcclGroup:
    """`with comm.group():` fuses the collectives issued inside into one NCCL launch."""

    def __init__(self, lib):
        self.lib = lib

    def __enter__(self):
        self.lib.ncclGroupStart()

    def __exit__(self, *exc):
        self.lib.ncclGroupEnd()


def ptr(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


class Watchdog(threading.Thread):
    """Aborts the communicator and exits if a collective outlives the timeout or NCCL reports
    an asynchronous error (a peer died, the network failed)."""

    def __init__(self, comm):
        super().__init__(daemon=True, name="nanolm-nccl-watchdog")
        self.comm, self.pending, self.lock = comm, [], threading.Lock()
        self.stopped = threading.Event()
        self.start()

    def watch(self, event, name):
        with self.lock:
            self.pending.append((event, name, time.monotonic() + self.comm.timeout_s))

    def stop(self):
        self.stopped.set()

    def run(self):
        while not self.stopped.wait(0.05):
            with self.lock:
                self.pending = [p for p in self.pending if not p[0].query()]
                late = [name for _, name, deadline in self.pending if time.monotonic() > deadline]
            error = self.comm.async_error() if self.comm.comm else NCCL_SUCCESS
            if late or error not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                what = f"{late[0]} timed out after {self.comm.timeout_s:.0f} s" if late else \
                    f"NCCL reported: {self.comm._message(error)}"
                print(f"nanolm.dist: rank {self.comm.env.rank}: {what}; aborting the communicator",
                      file=sys.stderr, flush=True)
                self.comm.abort()
                os._exit(1)


# ----------------------------------------------------------------------------- gloo (CPU)

class GlooComm:
    """The NcclComm interface on torch.distributed gloo, for CPU runs and tests. Gloo has no
    reduce-scatter, so reduce_scatter all-reduces and keeps this rank's slice (same result,
    more bytes: fine for tests, not for speed)."""

    def __init__(self, env, store, timeout_s=300.0):
        self.env, self.timeout_s, self.device = env, timeout_s, torch.device("cpu")
        tdist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world_size,
                                 timeout=datetime.timedelta(seconds=timeout_s))

    def _run(self, name, work):
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.env.rank}: {name} failed: {e}") from e
        return None

    def all_reduce(self, tensor, average=True):
        self._run("all_reduce", tdist.all_reduce(tensor, async_op=True))
        if average:
            tensor.div_(self.env.world_size)

    def reduce_scatter(self, output, input, average=True):
        self.all_reduce(input, average)
        n = output.numel()
        output.copy_(input[self.env.rank * n:(self.env.rank + 1) * n])

    def all_gather(self, output, input):
        self._run("all_gather", tdist.all_gather(list(output.chunk(self.env.world_size)), input, async_op=True))

    def broadcast(self, tensor, root=0):
        self._run("broadcast", tdist.broadcast(tensor, root, async_op=True))

    def wait(self, event):
        pass

    def group(self):
        return _NoGroup()

    def abort(self):
        tdist.destroy_process_group()

    def close(self):
        tdist.destroy_process_group()


class _NoGroup:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


def init(env, device, timeout_s=300.0):
    """The communicator for this process: NCCL on CUDA, gloo on CPU; None for one process."""
    if env.world_size == 1:
        return None
    store = rendezvous_store(env, timeout_s)
    return (NcclComm if device.type == "cuda" else GlooComm)(env, store, timeout_s)


# ----------------------------------------------------------------------------- buckets

@dataclass
class Bucket:
    start: int          # [start, end) of the flat gradient buffer; both multiples of world size
    end: int
    waiting: int        # parameters overlapping this bucket whose gradient is not final yet
    params: int         # how many parameters overlap it (to re-arm `waiting`)
    done: object = None  # the collective's completion event (NCCL) or None


def make_buckets(views, total, bucket_elems, world_size):
    """Split [0, total) into ranges of ~bucket_elems, built from the END of the flat buffer
    because the backward produces the last layers' gradients first. Boundaries are multiples
    of world_size so each bucket reduce-scatters into equal shards. `views` is a list of
    (offset, numel) of the parameters in the buffer. Returns buckets in launch order."""
    if total % world_size:
        raise ValueError(f"flat buffer of {total} elements is not padded to a multiple of {world_size}")
    buckets, end = [], total
    while end > 0:
        start = max(0, (end - bucket_elems) // world_size * world_size)
        overlapping = sum(1 for off, n in views if off < end and off + n > start)
        buckets.append(Bucket(start, end, overlapping, overlapping))
        end = start
    return buckets


class GradReducer:
    """Averages (or reduce-scatters, for ZeRO-1) the flat gradient buffer across ranks, one
    bucket at a time, launched from post-accumulate-grad hooks as soon as every parameter
    overlapping a bucket has its final gradient. Armed only for the last micro-step of a
    gradient-accumulation cycle; earlier micro-steps accumulate locally."""

    def __init__(self, comm, params, views, grads, bucket_bytes, shard):
        self.comm, self.grads, self.shard = comm, grads, shard
        W = comm.env.world_size
        elems = max(W, bucket_bytes // grads.element_size())
        self.buckets = make_buckets([(off, n) for _, off, n in views], grads.numel(), elems, W)
        self.armed = False
        for param, off, n in views:
            mine = [b for b in self.buckets if off < b.end and off + n > b.start]
            param.register_post_accumulate_grad_hook(lambda _, mine=mine: self._ready(mine))

    def arm(self):
        """Call before the backward whose gradients are the step's final ones."""
        for b in self.buckets:
            b.waiting, b.done = b.params, None
        self.armed = True

    def _ready(self, buckets):
        if not self.armed:
            return
        for b in buckets:
            b.waiting -= 1
            if b.waiting == 0:
                b.done = self._launch(b)

    def _launch(self, b):
        full = self.grads[b.start:b.end]
        if not self.shard:
            return self.comm.all_reduce(full)
        return self.comm.reduce_scatter(self.shard_of(b, self.grads), full)

    def shard_of(self, b, buffer):
        """This rank's slice of bucket b in a full-size flat buffer."""
        n = (b.end - b.start) // self.comm.env.world_size
        start = b.start + self.comm.env.rank * n
        return buffer[start:start + n]

    def finish(self):
        """After the backward: make the compute stream wait for every bucket's collective.
        A bucket not launched means a parameter got no gradient: that is a bug upstream."""
        missing = [(b.start, b.end) for b in self.buckets if b.waiting]
        if self.armed and missing:
            raise RuntimeError(f"gradient buckets never completed {missing}: some parameters "
                               "received no gradient in the backward (unused parameters?)")
        for b in self.buckets:
            if b.done is not None:
                self.comm.wait(b.done)
        self.armed = False
