"""CPU mirror of csrc/attention.cu, checked without a GPU.

Two layers of the CUDA kernels are re-enacted in float64 numpy with the kernels' own index
formulas, so a mistake there shows here in a second instead of on the next GPU run:
  1. fragment plumbing: ldmatrix(.trans) and mma.m16n8k16 emulated per lane (semantics from the
     PTX ISA) over the XOR-swizzled shared tiles, using the address math of load_a, load_b_nk,
     load_b_kn, mma_rows_by_rows and mma_frags_by_tile;
  2. tiling: the block loops, causal and sequence-end masks, online softmax, lse and delta of
     the forward, dK/dV and dQ kernels, with the tile sizes of Tiles<HS>.
Keep this file in step with the kernels when their tiling or fragment code changes.
"""
import numpy as np
import pytest

# ----------------------------------------------------------------------------- fragments

def swz(row, col, HS):
    return row * HS + (((col >> 3) ^ (row & 7)) << 3) + (col & 7)


def store_tile(tile, HS):  # load_tile's placement
    rows = tile.shape[0]
    s = np.full(rows * HS, np.nan)
    for r in range(rows):
        for c in range(0, HS, 8):
            o = swz(r, c, HS)
            s[o:o + 8] = tile[r, c:c + 8]
    return s


def ldsm_x4(smem, addr_of_lane, trans):
    mats = [np.stack([smem[addr_of_lane(8 * i + r):addr_of_lane(8 * i + r) + 8] for r in range(8)]) for i in range(4)]
    regs = np.zeros((32, 4, 2))
    for t in range(32):
        for i in range(4):
            m = mats[i].T if trans else mats[i]
            regs[t, i] = m[t // 4, 2 * (t % 4):2 * (t % 4) + 2]
    return regs


def mma(c, a, b0, b1):  # c (32,4), a (32,4,2), b0/b1 (32,2)
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for t in range(32):
        g, q = t // 4, t % 4
        A[g, 2*q:2*q+2] = a[t, 0]; A[g+8, 2*q:2*q+2] = a[t, 1]
        A[g, 2*q+8:2*q+10] = a[t, 2]; A[g+8, 2*q+8:2*q+10] = a[t, 3]
        B[2*q:2*q+2, g] = b0[t]; B[2*q+8:2*q+10, g] = b1[t]
    C = A @ B
    for t in range(32):
        g, q = t // 4, t % 4
        c[t] += [C[g, 2*q], C[g, 2*q+1], C[g+8, 2*q], C[g+8, 2*q+1]]


def frags_to_matrix(acc):  # acc (ntiles, 32, 4) -> (16, 8 * ntiles)
    M = np.zeros((16, 8 * acc.shape[0]))
    for n in range(acc.shape[0]):
        for t in range(32):
            g, q = t // 4, t % 4
            M[g, 8*n+2*q:8*n+2*q+2] = acc[n, t, :2]; M[g+8, 8*n+2*q:8*n+2*q+2] = acc[n, t, 2:]
    return M


def matrix_to_frags(M):
    acc = np.zeros((M.shape[1] // 8, 32, 4))
    for n in range(acc.shape[0]):
        for t in range(32):
            g, q = t // 4, t % 4
            acc[n, t] = [M[g, 8*n+2*q], M[g, 8*n+2*q+1], M[g+8, 8*n+2*q], M[g+8, 8*n+2*q+1]]
    return acc


def load_a(smem, HS, row0, k0):
    return ldsm_x4(smem, lambda l: swz(row0 + l % 16, k0 + (l // 16) * 8, HS), False)


def load_b_nk(smem, HS, n0, k0):
    return ldsm_x4(smem, lambda l: swz(n0 + l % 8 + (l // 16) * 8, k0 + ((l // 8) % 2) * 8, HS), False)


def load_b_kn(smem, HS, k0, n0):
    return ldsm_x4(smem, lambda l: swz(k0 + l % 8 + ((l // 8) % 2) * 8, n0 + (l // 16) * 8, HS), True)


def mma_rows_by_rows(HS, N, a_smem, a_row0, b_smem):
    acc = np.zeros((N // 8, 32, 4))
    for k0 in range(0, HS, 16):
        a = load_a(a_smem, HS, a_row0, k0)
        for n in range(0, N // 8, 2):
            b = load_b_nk(b_smem, HS, n * 8, k0)
            mma(acc[n], a, b[:, 0], b[:, 1]); mma(acc[n + 1], a, b[:, 2], b[:, 3])
    return acc


def mma_frags_by_tile(HS, K, x, smem):
    acc = np.zeros((HS // 8, 32, 4))
    for j in range(K // 16):
        a = np.stack([x[2*j][:, 0:2], x[2*j][:, 2:4], x[2*j+1][:, 0:2], x[2*j+1][:, 2:4]], axis=1)
        for n in range(0, HS // 8, 2):
            b = load_b_kn(smem, HS, j * 16, n * 8)
            mma(acc[n], a, b[:, 0], b[:, 1]); mma(acc[n + 1], a, b[:, 2], b[:, 3])
    return acc


# ----------------------------------------------------------------------------- tiling

LOG2E = 1.4426950408889634


def tiles(HS):
    return dict(fwdQ=64, fwdK=64, kvK=64, kvQ=32 if HS == 128 else 64, dqQ=64, dqK=32 if HS == 128 else 64)


def rows(x, r0, n):  # load_tile: zero-fill rows >= T
    out = np.zeros((n, x.shape[1])); m = max(0, min(n, x.shape[0] - r0)); out[:m] = x[r0:r0 + m]; return out


def fwd(q, k, v, scale):
    T, HS = q.shape; t = tiles(HS); BM = BN = t["fwdQ"]; sl2 = scale * LOG2E
    o = np.full((T, HS), np.nan); lse = np.full(T, np.nan)
    for qb in range((T + BM - 1) // BM):
        q0 = qb * BM; Q = rows(q, q0, BM); m = np.full(BM, -np.inf); l = np.zeros(BM); acc = np.zeros((BM, HS))
        row = q0 + np.arange(BM)
        for kb in range(qb + 1):
            s = Q @ rows(k, kb * BN, BN).T
            key = kb * BN + np.arange(BN)
            s = np.where((kb == qb) & (key[None, :] > row[:, None]), -np.inf, s * sl2)
            m_new = np.maximum(m, s.max(1)); alpha = np.exp2(m - m_new); m = m_new
            p = np.exp2(s - m[:, None]); l = l * alpha + p.sum(1); acc = acc * alpha[:, None] + p @ rows(v, kb * BN, BN)
        ok = row < T
        o[row[ok]] = (acc / l[:, None])[ok]; lse[row[ok]] = ((m + np.log2(l)) / LOG2E)[ok]
    return o, lse


def bwd(do, q, k, v, o, lse, scale):
    T, HS = q.shape; t = tiles(HS); sl2 = scale * LOG2E
    delta = (do * o).sum(1)
    dq, dk, dv = (np.full((T, HS), np.nan) for _ in range(3))
    BKV, BQ = t["kvK"], t["kvQ"]
    pad = lambda x, r0, n: np.concatenate([x[r0:r0 + n], np.zeros(max(0, r0 + n - T))])[:n]
    for kb in range((T + BKV - 1) // BKV):
        k0 = kb * BKV; K = rows(k, k0, BKV); V = rows(v, k0, BKV); key = k0 + np.arange(BKV)
        dK = np.zeros((BKV, HS)); dV = np.zeros((BKV, HS))
        for qb in range(k0 // BQ, (T + BQ - 1) // BQ):
            q0 = qb * BQ; Q = rows(q, q0, BQ); dO = rows(do, q0, BQ); query = q0 + np.arange(BQ)
            L = pad(lse, q0, BQ); D = pad(delta, q0, BQ)
            masked = k0 + BKV - 1 > q0 or q0 + BQ > T
            drop = masked & ((key[:, None] > query[None, :]) | (query[None, :] >= T))
            pt = np.where(drop, 0.0, np.exp2((K @ Q.T) * sl2 - L[None, :] * LOG2E))
            dV += pt @ dO
            dst = pt * (V @ dO.T - D[None, :])
            dK += dst @ Q
        ok = key < T
        dk[key[ok]] = (dK * scale)[ok]; dv[key[ok]] = dV[ok]
    BQ, BK = t["dqQ"], t["dqK"]
    for qb in range((T + BQ - 1) // BQ):
        q0 = qb * BQ; Q = rows(q, q0, BQ); dO = rows(do, q0, BQ); row = q0 + np.arange(BQ)
        L2 = pad(lse, q0, BQ) * LOG2E; D = pad(delta, q0, BQ); dQ = np.zeros((BQ, HS))
        for kb in range((min(q0 + BQ, T) + BK - 1) // BK):
            k0 = kb * BK; K = rows(k, k0, BK); key = k0 + np.arange(BK)
            drop = (k0 + BK - 1 > q0) & (key[None, :] > row[:, None])
            p = np.where(drop, 0.0, np.exp2((Q @ K.T) * sl2 - L2[:, None]))
            ds = p * (dO @ rows(v, k0, BK).T - D[:, None])
            dQ += ds @ K
        ok = row < T
        dq[row[ok]] = (dQ * scale)[ok]
    return dq, dk, dv


def reference(q, k, v, do, scale):
    T = q.shape[0]; s = q @ k.T * scale; s[np.triu_indices(T, 1)] = -np.inf
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1); p = np.exp(s - lse[:, None]); o = p @ v
    ds = p * (do @ v.T - (do * o).sum(1, keepdims=True))
    return o, lse, ds @ k * scale, ds.T @ q * scale, p.T @ do


@pytest.mark.parametrize("HS", [64, 128])
@pytest.mark.parametrize("N", [32, 64])
def test_fragment_products(HS, N):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, HS)); B = rng.standard_normal((N, HS))
    for warp in range(4):
        got = frags_to_matrix(mma_rows_by_rows(HS, N, store_tile(A, HS), warp * 16, store_tile(B, HS)))
        np.testing.assert_allclose(got, A[warp * 16:warp * 16 + 16] @ B.T, atol=1e-10)
    X = rng.standard_normal((16, N)); tile = rng.standard_normal((N, HS))
    got = frags_to_matrix(mma_frags_by_tile(HS, N, matrix_to_frags(X), store_tile(tile, HS)))
    np.testing.assert_allclose(got, X @ tile, atol=1e-10)


@pytest.mark.parametrize("HS", [64, 128])
def test_swizzle_is_conflict_free(HS):
    """The 8 row addresses of each ldmatrix phase (and cp.async wave) hit 8 distinct 16-byte
    bank groups, for every chunk column."""
    for col in range(0, HS, 8):
        groups = {(swz(r, col, HS) * 2 // 16) % 8 for r in range(8)}
        assert len(groups) == 8, (HS, col)


@pytest.mark.parametrize("HS", [64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 65, 100, 257])
def test_tiling_matches_math(HS, T):
    rng = np.random.default_rng(T)
    q, k, v, do = (rng.standard_normal((T, HS)) for _ in range(4))
    scale = HS ** -0.5
    o, lse = fwd(q, k, v, scale)
    got = (o, lse, *bwd(do, q, k, v, o, lse, scale))
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), got, reference(q, k, v, do, scale)):
        np.testing.assert_allclose(x, ref, atol=1e-10, err_msg=f"{name}, HS={HS}, T={T}")
