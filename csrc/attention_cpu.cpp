// Causal flash attention on the CPU, fp32: forward and backward (FlashAttention-2 tiling).
//
// Per (b, h): S = scale * Q K^T (causal), P = softmax(S), O = P V, lse = logsumexp(S).
// Backward: delta = rowsum(dO * O), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
// dQ = scale * dS K, dK = scale * dS^T Q.
//
// Forward: one task per (b, h, tile of BQ queries), OpenMP over all of them, longest first.
// The task streams 64-key tiles: S tile by a register-blocked matmul, online softmax in base 2
// (a vectorised exp2, since a scalar expf per score would cost as much as the matmuls), and
// O += P V. Backward: one task per (b, h); key tiles in order, and for each the query tiles at
// or below it: P recomputed from lse, dV and dK accumulated for the key tile, dQ accumulated in
// a per-task fp32 buffer. Every sum runs in a fixed order whatever the thread count:
// deterministic. Cost as kernels/attention.py: forward 4*B*nh*T^2*hs/2 FLOPs, backward 5
// matmuls (2.5x); memory traffic is small (tiles stay in L1/L2): compute-bound.
//
// Dropout of P (dropout.h), when enabled: O = Pd V with Pd = P * factor, the softmax's sums
// taken over the undropped P; factors of a (query tile, key tile) pair are generated into a
// transposed tile like S^T (one Philox call per 4 keys of a query row). The backward
// regenerates them: dV = Pd^T dO and dS = P * (dO V^T * factor - delta). Disabled, the
// kDropout = false instantiations are the code without dropout.
//
// Layout: q, k, v, dq, dk, dv rows are hs contiguous floats at any (b, t, h) strides; o, do are
// contiguous (B, T, nh, hs). Offsets are int64 (B*T*3C passes 2^31 at GPT-2 sizes). hs must
// be a multiple of 16 up to 256 (the matmul works in 16-column panels).
#include "attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "dropout.h"

namespace nanolm {
namespace {

constexpr int BQ = 64;  // queries per tile
constexpr int BK = 64;  // keys per tile; equal to BQ so diagonal tiles line up
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(32)));  // 8 floats (one AVX register)
typedef int32_t vi __attribute__((vector_size(32)));

inline vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return _mm256_set1_ps(x); }  // vf{} + x costs an add per broadcast

inline vf fmadd(vf a, vf b, vf c) {
#ifdef __FMA__
    return _mm256_fmadd_ps(a, b, c);  // ISO C++ mode does not contract a * b + c by itself
#else
    return a * b + c;
#endif
}

// 2^x for x <= 0 (x < -126, -inf included, gives 0): 2^n * 2^f with n = round(x),
// f in [-0.5, 0.5], 2^f = e^(f ln2) by its Taylor series to degree 7 (relative error < 2e-7).
inline vf exp2v(vf x) {
    vf xc = x < -126.0f ? splat(-126.0f) : x;
    vi n = __builtin_convertvector(xc - 0.5f, vi);                 // truncation toward zero...
    n += __builtin_convertvector(n, vf) > xc - 0.5f;              // ...made a floor (true is -1)
    n += 1;                                                        // floor(x - 0.5) + 1 = round(x)
    vf f = xc - __builtin_convertvector(n, vf);
    vf p = splat(1.525273380405984e-05f);
    p = fmadd(p, f, splat(1.5403530393381608e-04f));
    p = fmadd(p, f, splat(1.3333558146428443e-03f));
    p = fmadd(p, f, splat(9.618129107628477e-03f));
    p = fmadd(p, f, splat(5.550410866482158e-02f));
    p = fmadd(p, f, splat(0.2402265069591007f));
    p = fmadd(p, f, splat(0.6931471805599453f));
    p = fmadd(p, f, splat(1.0f));
    vi bits = (n + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -126.0f ? vf{} : p * scale;
}

// C[R rows][N] += A[R][K] B[K][N], N a multiple of 16, R x 16 accumulators in registers.
// A_T: A is stored transposed (element (r, kk) at A[kk * lda + r]), which saves transposing
// score tiles: the backward computes S^T and needs both S^T and S as left operands.
template <int R, bool A_T>
void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
               int K, int N) {
    for (int n = 0; n < N; n += 16) {
        vf acc[R][2];
        for (int r = 0; r < R; ++r) {
            acc[r][0] = loadu(C + r * ldc + n);
            acc[r][1] = loadu(C + r * ldc + n + 8);
        }
        for (int kk = 0; kk < K; ++kk) {
            vf b0 = loadu(B + kk * ldb + n), b1 = loadu(B + kk * ldb + n + 8);
            for (int r = 0; r < R; ++r) {
                vf a = splat(A_T ? A[kk * lda + r] : A[r * lda + kk]);
                acc[r][0] = fmadd(a, b0, acc[r][0]);
                acc[r][1] = fmadd(a, b1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; ++r) {
            storeu(C + r * ldc + n, acc[r][0]);
            storeu(C + r * ldc + n + 8, acc[r][1]);
        }
    }
}

// C[M][N] += A[M][K] B[K][N]; strides in elements; rows of B and C hold N contiguous floats.
// Six rows at a time: 12 accumulators + 2 B vectors + 1 broadcast fit AVX2's 16 registers.
template <bool A_T = false>
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int M, int K, int N) {
    auto a_rows = [&](int m) { return A_T ? A + m : A + m * lda; };
    int m = 0;
    for (; m + 6 <= M; m += 6) gemm_rows<6, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K, N);
    for (; m + 2 <= M; m += 2) gemm_rows<2, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K, N);
    for (; m < M; ++m) gemm_rows<1, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K, N);
}

// dst[c][r] = src[r][c] for r < rows, c < cols; dst[c][rows..ld_dst) = 0.
void transpose(const float* src, int64_t ld_src, int rows, int cols, float* dst, int64_t ld_dst) {
    for (int c = 0; c < cols; ++c) {
        for (int r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
        std::fill(dst + c * ld_dst + rows, dst + (c + 1) * ld_dst, 0.0f);
    }
}

// A (B, T, nh, hs) tensor with unit stride over hs.
struct Heads {
    float* p;
    int64_t sb, st, sh;
    float* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

// Transposed scores St[key c][query r] of keys j0.. and queries i0..: scaled by c, and keys
// after their query (only on the diagonal tile, where j0 == i0) set to -inf.
void scale_and_mask(float* St, int nk, int i0, int j0, float c) {
    for (int col = 0; col < nk; ++col) {
        float* s = St + col * BQ;
        for (int r = 0; r < BQ; r += 8) storeu(s + r, loadu(s + r) * c);
        if (j0 == i0)
            for (int r = 0; r < col; ++r) s[r] = NEG_INF;
    }
}

// Transposed dropout factors Ft[key c][query r] of queries i0.. (nq of BQ; 0 for the rest) and
// keys j0.. (nk) of head bh: element ((bh * T + i) * T + j) of the (B, nh, T, T) probabilities.
void dropout_tile(const DropoutParams& d, float* ft, float* row, int64_t bh, int64_t T, int i0, int nq,
                  int j0, int nk) {
    for (int r = 0; r < BQ; ++r) {
        if (r < nq)
            dropout_factors(d, static_cast<uint64_t>((bh * T + i0 + r) * T + j0), nk, row);
        for (int col = 0; col < nk; ++col) ft[col * BQ + r] = r < nq ? row[col] : 0.0f;
    }
}

// Forward of one (b, h, query tile), on transposed tiles: St = K Q^T puts the queries along the
// vectors, so the softmax's per-query max, sum and rescale are plain vector operations.
struct FwdBuffers {
    std::vector<float> qt, st, acc, ft, frow;  // ft, frow: dropout factors (tile, one row)
    vf m[BQ / 8], l[BQ / 8];
    explicit FwdBuffers(int hs) : qt(hs * BQ), st(BK * BQ), acc(BQ * hs), ft(BK * BQ), frow(BK) {}
};

void online_softmax_update(FwdBuffers& w, int nk, int hs) {
    vf alpha[BQ / 8];
    for (int g = 0; g < BQ / 8; ++g) {
        vf m_new = w.m[g];
        for (int col = 0; col < nk; ++col) {
            vf s = loadu(&w.st[col * BQ + g * 8]);
            m_new = s > m_new ? s : m_new;
        }
        alpha[g] = exp2v(w.m[g] - m_new);  // m_new is finite: key j0 <= every query of the tile
        vf sum{};
        for (int col = 0; col < nk; ++col) {
            vf p = exp2v(loadu(&w.st[col * BQ + g * 8]) - m_new);
            storeu(&w.st[col * BQ + g * 8], p);
            sum += p;
        }
        w.l[g] = w.l[g] * alpha[g] + sum;
        w.m[g] = m_new;
    }
    for (int r = 0; r < BQ; ++r) {
        float a = alpha[r / 8][r % 8];
        for (int d = 0; d < hs; ++d) w.acc[r * hs + d] *= a;
    }
}

template <bool kDropout>
void fwd_tile(const Heads& q, const Heads& k, const Heads& v, float* o, float* lse, int64_t b,
              int64_t h, int64_t T, int64_t nh, int hs, int i0, float c, const DropoutParams& dropout,
              FwdBuffers& w) {
    int nq = std::min<int64_t>(BQ, T - i0);
    transpose(q.row(b, h, i0), q.st, nq, hs, w.qt.data(), BQ);
    std::fill(w.acc.begin(), w.acc.end(), 0.0f);
    for (int g = 0; g < BQ / 8; ++g) w.m[g] = splat(NEG_INF), w.l[g] = vf{};
    for (int j0 = 0; j0 < i0 + nq; j0 += BK) {
        int nk = std::min(BK, i0 + nq - j0);
        std::fill(w.st.begin(), w.st.end(), 0.0f);
        gemm(k.row(b, h, j0), k.st, w.qt.data(), BQ, w.st.data(), BQ, nk, hs, BQ);  // S^T = K Q^T
        scale_and_mask(w.st.data(), nk, i0, j0, c);
        online_softmax_update(w, nk, hs);
        if constexpr (kDropout) {  // P~ -> P~ * factor, after its sum went into l
            dropout_tile(dropout, w.ft.data(), w.frow.data(), b * nh + h, T, i0, nq, j0, nk);
            for (int e = 0; e < nk * BQ; e += 8) storeu(&w.st[e], loadu(&w.st[e]) * loadu(&w.ft[e]));
        }
        gemm<true>(w.st.data(), BQ, v.row(b, h, j0), v.st, w.acc.data(), hs, nq, nk, hs);  // O += P V
    }
    for (int r = 0; r < nq; ++r) {
        float l = w.l[r / 8][r % 8], m = w.m[r / 8][r % 8];
        float* out = o + ((b * T + i0 + r) * nh + h) * hs;
        for (int d = 0; d < hs; ++d) out[d] = w.acc[r * hs + d] / l;
        lse[(b * nh + h) * T + i0 + r] = (m + std::log2(l)) * LN2;
    }
}

void check_sizes(const char* op, int64_t B, int64_t T, int64_t nh, int64_t hs) {
    require(B > 0 && T > 0 && nh > 0, std::string(op) + ": B, T, nh must be positive");
    require(hs % 16 == 0 && hs >= 16 && hs <= 256,
            std::string(op) + ": hs must be a multiple of 16 in [16, 256], got " + std::to_string(hs));
}

}  // namespace

void attention_fwd_cpu(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                       std::uintptr_t lse, int64_t B, int64_t T, int64_t nh, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh, int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh, double scale, const DropoutParams& dropout) {
    check_sizes("attention_fwd_cpu", B, T, nh, hs);
    const Heads Q{ptr<float>(q), sqb, sqt, sqh}, K{ptr<float>(k), skb, skt, skh},
        V{ptr<float>(v), svb, svt, svh};
    const int64_t tiles = (T + BQ - 1) / BQ, tasks = B * nh * tiles;
    const float c = static_cast<float>(scale) * LOG2E;
#pragma omp parallel
    {
        FwdBuffers w(static_cast<int>(hs));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            int64_t tile = tiles - 1 - task / (B * nh);  // longest (last) query tiles first
            int64_t bh = task % (B * nh);
            auto run = dropout.enabled ? fwd_tile<true> : fwd_tile<false>;
            run(Q, K, V, ptr<float>(o), ptr<float>(lse), bh / nh, bh % nh, T, nh, static_cast<int>(hs),
                static_cast<int>(tile * BQ), c, dropout, w);
        }
    }
}

namespace {

// Per-head buffers of the backward; qt, dot (Q^T, dO^T) are padded with zeros to whole tiles.
struct BwdBuffers {
    int64_t tp;  // T rounded up to a multiple of BQ
    std::vector<float> qt, dot, st, dpt, dk, dv, dq, lse2, delta, ft, frow;
    BwdBuffers(int hs, int64_t T)
        : tp((T + BQ - 1) / BQ * BQ), qt(hs * tp), dot(hs * tp), st(BK * BQ), dpt(BK * BQ),
          dk(BK * hs), dv(BK * hs), dq(T * hs), lse2(tp), delta(tp), ft(BK * BQ), frow(BK) {}
};

// One query tile's contribution to key tile j0: dV, dK (of the key tile), dQ (of the query
// tile). Scores are formed transposed (keys x queries) from Q^T, dO^T made once per head.
template <bool kDropout>
void bwd_tile_pair(const Heads& q, const Heads& k, const Heads& v, const float* dout, int64_t b,
                   int64_t h, int64_t T, int64_t nh, int hs, int i0, int j0, int nk, float c,
                   const DropoutParams& dropout, BwdBuffers& w) {
    int nq = std::min<int64_t>(BQ, T - i0);
    const float* do0 = dout + ((b * T + i0) * nh + h) * hs;
    std::fill(w.st.begin(), w.st.end(), 0.0f);
    gemm(k.row(b, h, j0), k.st, w.qt.data() + i0, w.tp, w.st.data(), BQ, nk, hs, BQ);    // S^T
    std::fill(w.dpt.begin(), w.dpt.end(), 0.0f);
    gemm(v.row(b, h, j0), v.st, w.dot.data() + i0, w.tp, w.dpt.data(), BQ, nk, hs, BQ);  // dP^T
    scale_and_mask(w.st.data(), nk, i0, j0, c);
    if constexpr (kDropout) dropout_tile(dropout, w.ft.data(), w.frow.data(), b * nh + h, T, i0, nq, j0, nk);
    for (int col = 0; col < nk; ++col) {
        for (int r = 0; r < BQ; r += 8) {
            float* s = &w.st[col * BQ + r];
            float* dp = &w.dpt[col * BQ + r];
            vf p = exp2v(loadu(s) - loadu(&w.lse2[i0 + r]));
            if constexpr (kDropout) {
                vf f = loadu(&w.ft[col * BQ + r]);
                storeu(s, p * f);                                               // Pd^T
                storeu(dp, p * (loadu(dp) * f - loadu(&w.delta[i0 + r])));     // dS^T
            } else {
                storeu(s, p);                                          // P^T
                storeu(dp, p * (loadu(dp) - loadu(&w.delta[i0 + r])));  // dS^T = P^T (dP^T - delta)
            }
        }
    }
    gemm(w.st.data(), BQ, do0, nh * hs, w.dv.data(), hs, nk, nq, hs);             // dV += P^T dO
    gemm(w.dpt.data(), BQ, q.row(b, h, i0), q.st, w.dk.data(), hs, nk, nq, hs);   // dK += dS^T Q
    gemm<true>(w.dpt.data(), BQ, k.row(b, h, j0), k.st, w.dq.data() + i0 * hs, hs, nq, nk, hs);  // dQ += dS K
}

void store_rows(const float* src, int rows, int hs, float factor, const Heads& dst, int64_t b,
                int64_t h, int64_t t0) {
    for (int r = 0; r < rows; ++r) {
        float* out = dst.row(b, h, t0 + r);
        for (int d = 0; d < hs; ++d) out[d] = src[r * hs + d] * factor;
    }
}

template <bool kDropout>
void bwd_head(const Heads& q, const Heads& k, const Heads& v, const float* dout, const float* o,
              const float* lse, const Heads& dq, const Heads& dk, const Heads& dv, int64_t b,
              int64_t h, int64_t T, int64_t nh, int hs, float scale, const DropoutParams& dropout,
              BwdBuffers& w) {
    const float* do_head = dout + (b * T * nh + h) * hs;
    std::fill(w.lse2.begin(), w.lse2.end(), 0.0f);  // padding queries: finite values, never used
    std::fill(w.delta.begin(), w.delta.end(), 0.0f);
    for (int64_t t = 0; t < T; ++t) {
        const float* dor = do_head + t * nh * hs;
        const float* orow = o + ((b * T + t) * nh + h) * hs;
        float acc = 0.0f;
        for (int d = 0; d < hs; ++d) acc += dor[d] * orow[d];
        w.delta[t] = acc;
        w.lse2[t] = lse[(b * nh + h) * T + t] * LOG2E;
    }
    transpose(q.row(b, h, 0), q.st, static_cast<int>(T), hs, w.qt.data(), w.tp);
    transpose(do_head, nh * hs, static_cast<int>(T), hs, w.dot.data(), w.tp);
    std::fill(w.dq.begin(), w.dq.end(), 0.0f);
    const float c = scale * LOG2E;
    for (int j0 = 0; j0 < T; j0 += BK) {
        int nk = std::min<int64_t>(BK, T - j0);
        std::fill(w.dk.begin(), w.dk.end(), 0.0f);
        std::fill(w.dv.begin(), w.dv.end(), 0.0f);
        for (int i0 = j0; i0 < T; i0 += BQ)
            bwd_tile_pair<kDropout>(q, k, v, dout, b, h, T, nh, hs, i0, j0, nk, c, dropout, w);
        store_rows(w.dk.data(), nk, hs, scale, dk, b, h, j0);
        store_rows(w.dv.data(), nk, hs, 1.0f, dv, b, h, j0);
    }
    store_rows(w.dq.data(), static_cast<int>(T), hs, scale, dq, b, h, 0);
}

}  // namespace

void attention_bwd_cpu(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t o, std::uintptr_t lse, std::uintptr_t dq, std::uintptr_t dk,
                       std::uintptr_t dv, int64_t B, int64_t T, int64_t nh, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh, int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh, int64_t sdqb, int64_t sdqt,
                       int64_t sdqh, int64_t sdkb, int64_t sdkt, int64_t sdkh, int64_t sdvb,
                       int64_t sdvt, int64_t sdvh, double scale, const DropoutParams& dropout) {
    check_sizes("attention_bwd_cpu", B, T, nh, hs);
    const Heads Q{ptr<float>(q), sqb, sqt, sqh}, K{ptr<float>(k), skb, skt, skh},
        V{ptr<float>(v), svb, svt, svh}, DQ{ptr<float>(dq), sdqb, sdqt, sdqh},
        DK{ptr<float>(dk), sdkb, sdkt, sdkh}, DV{ptr<float>(dv), sdvb, sdvt, sdvh};
#pragma omp parallel
    {
        BwdBuffers w(static_cast<int>(hs), T);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * nh; ++bh) {
            auto run = dropout.enabled ? bwd_head<true> : bwd_head<false>;
            run(Q, K, V, ptr<const float>(dout), ptr<const float>(o), ptr<const float>(lse), DQ, DK, DV,
                bh / nh, bh % nh, T, nh, static_cast<int>(hs), static_cast<float>(scale), dropout, w);
        }
    }
}

}  // namespace nanolm
