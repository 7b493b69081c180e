"""The model bytes of every memory-bound benchmarked op: the work unit behind GB/s (the FLOP
counts behind TFLOP/s are in nanolm/flops.py, shared with the trainer's MFU).

Bytes count each tensor the op must touch once (the minimum traffic of an ideal kernel), so
GB/s / memory bandwidth (bench/timing.py) says how close a kernel is to the memory roofline; temporaries an
implementation adds are its own cost. `s` is the activation element size (2 for bf16,
4 for fp32); statistics (mean, rstd, lse, losses) are float32.

  layernorm fwd            read x N·C·s, w and b 2C·s;            write y N·C·s, mean+rstd 2N·4
  layernorm fwd+residual   read x, residual 2N·C·s, w, b 2C·s;    write y, residual_out 2N·C·s,
                                                                   mean+rstd 2N·4
  layernorm bwd            read dy, x 2N·C·s, w C·s, mean+rstd 2N·4; write dx N·C·s, dw+db 2C·4
  rmsnorm fwd(+residual)   as layernorm's, without b and mean:   w C·s, rstd N·4
  rmsnorm bwd              read dy, x 2N·C·s, w C·s, rstd N·4;    write dx N·C·s, dw C·4
  cross-entropy (logits)   read logits N·Vp·s, targets 8N;        write dlogits N·Vp·s, losses 4N
  adamw                    read p, g, m, v 16 B/param;            write p, m, v 12 B/param = 28 B
  qk-norm + rope fwd       read qkv N·W·s;                         write qkv' N·W·s, rstd N·(H+Hkv)·4
  qk-norm + rope bwd       read dout, qkv 2N·W·s, rstd;            write dqkv N·W·s   (W = (H+2Hkv)·hs)
  swiglu fwd / bwd         read 2N·F·s, write N·F·s / read 3N·F·s, write 2N·F·s
  relu2 fwd / bwd          read N·F·s, write N·F·s / read 2N·F·s, write N·F·s
"""


def layernorm_fwd_bytes(N, C, s, residual=False):
    streams = 4 if residual else 2  # x (+ residual) read, y (+ residual_out) written
    return streams * N * C * s + 2 * C * s + 2 * N * 4


def layernorm_bwd_bytes(N, C, s):
    return 3 * N * C * s + C * s + 2 * N * 4 + 2 * C * 4


def rmsnorm_fwd_bytes(N, C, s, residual=False):
    streams = 4 if residual else 2
    return streams * N * C * s + C * s + N * 4


def rmsnorm_bwd_bytes(N, C, s):
    return 3 * N * C * s + C * s + N * 4 + C * 4


def cross_entropy_bytes(N, Vp, s):
    return 2 * N * Vp * s + 8 * N + 4 * N


def adamw_bytes(n_params):
    return 28 * n_params



def rope_bytes(N, width, rstd_heads, s, backward=False):
    return (3 if backward else 2) * N * width * s + N * rstd_heads * 4


def mlp_activation_bytes(N, F, s, kind, backward=False):
    reads, writes = {("swiglu", False): (2, 1), ("swiglu", True): (3, 2), ("relu2", False): (1, 1),
                     ("relu2", True): (2, 1)}[kind, backward]
    return (reads + writes) * N * F * s
