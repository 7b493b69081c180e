"""FLOP counts and peak throughput: the one place the trainer's MFU and the bench's TFLOP/s
take them from.

  attention fwd        4·B·nh·T²·hs FLOPs (QK^T and PV), halved for causal
  attention bwd        2.5x fwd (5 matmuls to the forward's 2, one being a recompute of S)
  attention fwd+bwd    3.5x fwd
  linear cross-entropy 6·N·C·Vp FLOPs (logits, dh, dW matmuls: 2·N·C·Vp each)
  train step           6·n_params + 6·n_layer·C·T FLOPs per token: the matmuls' 6N (PaLM,
                       appendix B) plus causal attention's 3 x 2·C·T (fwd + bwd, half of PaLM's
                       non-causal 12·L·C·T); n_params without position embeddings
"""

# Dense bf16 tensor-core peak, TFLOP/s, matched by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0}

ATTENTION_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def peak_tflops(device_name):
    """The datasheet peak of a GPU by name, or None when it is not in PEAK_TFLOPS."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def attention_flops(B, nh, T, hs, mode="fwd", causal=True):
    fwd = 4 * B * nh * T * T * hs / (2 if causal else 1)
    return fwd * ATTENTION_MODE_FACTOR[mode]


def linear_cross_entropy_flops(N, C, Vp):
    return 6 * N * C * Vp


def train_flops_per_token(n_params, n_layer, n_embd, T):
    return 6 * n_params + 6 * n_layer * n_embd * T
