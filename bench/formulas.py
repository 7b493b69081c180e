"""The model bytes and FLOPs of every benchmarked op: the work units behind GB/s and TFLOP/s.

Bytes count each tensor the op must touch once (the minimum traffic of an ideal kernel), so
GB/s / memory bandwidth (bench/timing.py) says how close a kernel is to the memory roofline; temporaries an
implementation adds are its own cost. `s` is the activation element size (2 for bf16,
4 for fp32); statistics (mean, rstd, lse, losses) are float32.

  layernorm fwd            read x N·C·s, w and b 2C·s;            write y N·C·s, mean+rstd 2N·4
  layernorm fwd+residual   read x, residual 2N·C·s, w, b 2C·s;    write y, residual_out 2N·C·s,
                                                                   mean+rstd 2N·4
  layernorm bwd            read dy, x 2N·C·s, w C·s, mean+rstd 2N·4; write dx N·C·s, dw+db 2C·4
  cross-entropy (logits)   read logits N·Vp·s, targets 8N;        write dlogits N·Vp·s, losses 4N
  adamw                    read p, g, m, v 16 B/param;            write p, m, v 12 B/param = 28 B
  attention fwd            4·B·nh·T²·hs FLOPs (QK^T and PV), halved for causal
  attention bwd            2.5x fwd (5 matmuls to the forward's 2, one being a recompute of S)
  attention fwd+bwd        3.5x fwd
  linear cross-entropy     6·N·C·Vp FLOPs (logits, dh, dW matmuls: 2·N·C·Vp each)
  train step               6·n_params + 6·n_layer·C·T FLOPs per token: the matmuls' 6N (PaLM,
                           appendix B) plus causal attention's 3 x 2·C·T (fwd + bwd, half of
                           PaLM's non-causal 12·L·C·T); n_params without position embeddings.
                           The count nanolm/train.py logs MFU with (flops_per_token)
"""


def layernorm_fwd_bytes(N, C, s, residual=False):
    streams = 4 if residual else 2  # x (+ residual) read, y (+ residual_out) written
    return streams * N * C * s + 2 * C * s + 2 * N * 4


def layernorm_bwd_bytes(N, C, s):
    return 3 * N * C * s + C * s + 2 * N * 4 + 2 * C * 4


def cross_entropy_bytes(N, Vp, s):
    return 2 * N * Vp * s + 8 * N + 4 * N


def adamw_bytes(n_params):
    return 28 * n_params


ATTENTION_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(B, nh, T, hs, mode="fwd", causal=True):
    fwd = 4 * B * nh * T * T * hs / (2 if causal else 1)
    return fwd * ATTENTION_MODE_FACTOR[mode]


def linear_cross_entropy_flops(N, C, Vp):
    return 6 * N * C * Vp


def train_flops_per_token(n_params, n_layer, n_embd, T):
    return 6 * n_params + 6 * n_layer * n_embd * T
