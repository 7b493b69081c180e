// Causal flash attention on the CPU, fp32, bf16 or fp16 q/k/v: forward and backward (FlashAttention-2
// tiling).
//
// Per (b, query head h), with g = h / (nh / nkv) its K/V head (grouped-query attention; nkv == nh
// is multi-head attention): S = scale * Q_h K_g^T (causal), P = softmax(S), O = P V_g,
// lse = logsumexp(S). Backward: delta = rowsum(dO * O), dV_g = sum over g's query heads of P^T dO,
// dP = dO V_g^T, dS = P * (dP - delta), dQ = scale * dS K_g, dK_g = scale * sum of dS^T Q.
//
// Forward: one task per (b, h, tile of BQ queries), OpenMP over all of them, longest first.
// The task streams 64-key tiles: S tile by a register-blocked matmul, online softmax in base 2
// (a vectorised exp2, since a scalar expf per score would cost as much as the matmuls), and
// O += P V. Tasks of one query tile run head after head, so a group's query heads read the same
// K/V tiles one after another (from L2 after the first). Backward: one task per (b, K/V head g):
// K_g, V_g widened once; for each query head of g's group in turn, key tiles in order, and for
// each the query tiles at or below it: P recomputed from lse, dV and dK accumulated into the
// task's fp32 buffers for all of g's keys, dQ into a per-query-head fp32 buffer. Every sum runs
// in a fixed order whatever the thread count: deterministic, and no two tasks write one
// element. With groups of one this is the multi-head order exactly (each key tile's sums run
// over its query tiles in order from zero). Cost as kernels/attention.py: forward 4*B*nh*T^2*hs/2 FLOPs, backward 5
// matmuls (2.5x); memory traffic is small (tiles stay in L1/L2): compute-bound.
//
// bf16/fp16: every tile a matmul reads is widened to fp32 first (a key tile per query tile in the
// forward, each head's q, k, v, do once in the backward), so all products, the softmax and
// every accumulator are fp32; o, dq, dk, dv are rounded to 16 bits once, when stored. lse is fp32.
// Exception: the bf16 forward on an AMD CPU with AVX512-BF16 (checked when compiling, with
// __AVX512BF16__, and when running; why AMD only: cpu_has_bf16_dot) does its two matmuls with
// vdpbf16ps, which multiplies pairs of bf16 and accumulates in fp32 (32 products per
// instruction, against 16 for an fp32 FMA): S^T = K Q^T straight from the bf16 inputs, and
// O += P V with P rounded to bf16, as FlashAttention does on GPUs. The softmax and every
// accumulator stay fp32.
//
// Dropout of P (dropout.h), when enabled: O = Pd V with Pd = P * factor, the softmax's sums
// taken over the undropped P; factors of a (query tile, key tile) pair are generated into a
// transposed tile like S^T (one Philox call per 4 keys of a query row) and applied to the fp32
// P (before it is rounded to bf16 on the dot-product path). The backward regenerates them:
// dV = Pd^T dO and dS = P * (dO V^T * factor - delta). Disabled, the kDropout = false
// instantiations are the code without dropout.
//
// Layout: q, k, v, dq, dk, dv rows are hs contiguous values at any (b, t, h) strides; o, do are
// contiguous (B, T, nh, hs). Offsets are int64 (B*T*3C passes 2^31 at GPT-2 sizes). hs must
// be a multiple of 16 up to 256 (the matmul works in 16-column panels).
#include "attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_bf16.h"
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

// The matmuls' vectors: 16 floats with AVX-512 (32 registers), else 8 (AVX2's 16). The
// softmax above keeps 8-float vectors: its loops are short and bound by exp2v.
#ifdef __AVX512F__
constexpr int W = 16;
typedef float vg __attribute__((vector_size(64)));
inline vg splat_g(float x) { return _mm512_set1_ps(x); }
inline vg fmadd_g(vg a, vg b, vg c) { return _mm512_fmadd_ps(a, b, c); }
#else
constexpr int W = 8;
typedef float vg __attribute__((vector_size(32)));
inline vg splat_g(float x) { return splat(x); }
inline vg fmadd_g(vg a, vg b, vg c) { return fmadd(a, b, c); }
#endif
inline vg load_g(const float* p) { vg v; std::memcpy(&v, p, sizeof v); return v; }
inline void store_g(float* p, vg v) { std::memcpy(p, &v, sizeof v); }

// C[R rows][NV * W columns] += A[R][K] B[K][NV * W]: R x NV accumulators stay in registers,
// and each step of k loads NV vectors of B and broadcasts R values of A.
// A_T: A is stored transposed (element (r, kk) at A[kk * lda + r]), which saves transposing
// score tiles: the backward computes S^T and needs both S^T and S as left operands.
template <int R, int NV, bool A_T>
void gemm_panel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int K) {
    vg acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = load_g(C + r * ldc + j * W);
    for (int kk = 0; kk < K; ++kk) {
        vg b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load_g(B + kk * ldb + j * W);
        for (int r = 0; r < R; ++r) {
            const vg a = splat_g(A_T ? A[kk * lda + r] : A[r * lda + kk]);
            for (int j = 0; j < NV; ++j) acc[r][j] = fmadd_g(a, b[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) store_g(C + r * ldc + j * W, acc[r][j]);
}

// All M rows of one panel of NV vectors: blocks of rows sized so that the R x NV accumulators,
// NV vectors of B and a broadcast fit the register file (AVX-512: 12 x 2 + 3 of 32; AVX2: 6 x 2 + 3
// of 16).
template <int NV, bool A_T>
void gemm_panel_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int M, int K) {
    constexpr int RB = W == 16 ? 12 : 6;
    auto a_rows = [&](int m) { return A_T ? A + m : A + m * lda; };
    int m = 0;
    for (; m + RB <= M; m += RB) gemm_panel<RB, NV, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K);
    for (; m + 4 <= M; m += 4) gemm_panel<4, NV, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K);
    for (; m < M; ++m) gemm_panel<1, NV, A_T>(a_rows(m), lda, B, ldb, C + m * ldc, ldc, K);
}

// C[M][N] += A[M][K] B[K][N]; strides in elements; rows of B and C hold N contiguous floats,
// N a multiple of 16: panels of two vectors, and with AVX-512 a last panel of one where
// N % 32 == 16.
template <bool A_T = false>
void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          int M, int K, int N) {
    int n = 0;
    for (; n + 2 * W <= N; n += 2 * W) gemm_panel_rows<2, A_T>(A, lda, B + n, ldb, C + n, ldc, M, K);
    if (n < N) gemm_panel_rows<1, A_T>(A, lda, B + n, ldb, C + n, ldc, M, K);
}

// dst[c][r] = src[r][c] for r < rows, c < cols; dst[c][rows..ld_dst) = 0.
template <typename T>
void transpose(const T* src, int64_t ld_src, int rows, int cols, float* dst, int64_t ld_dst) {
    for (int c = 0; c < cols; ++c) {
        for (int r = 0; r < rows; ++r) dst[c * ld_dst + r] = to_float(src[r * ld_src + c]);
        std::fill(dst + c * ld_dst + rows, dst + (c + 1) * ld_dst, 0.0f);
    }
}

// A (B, T, nh, hs) tensor with unit stride over hs.
template <typename T>
struct Heads {
    T* p;
    int64_t sb, st, sh;
    T* row(int64_t b, int64_t h, int64_t t) const { return p + b * sb + h * sh + t * st; }
};

// Rows t0..t0+rows of head (b, h) as fp32 rows `ld` apart: in place for fp32, else widened
// into buf (rows * hs floats).
template <typename T>
const float* rows_f32(const Heads<T>& x, int64_t b, int64_t h, int64_t t0, int rows, int hs, float* buf,
                      int64_t& ld) {
    if constexpr (std::is_same_v<T, float>) {
        ld = x.st;
        return x.row(b, h, t0);
    } else {
        for (int r = 0; r < rows; ++r) widen(x.row(b, h, t0 + r), buf + r * hs, hs);
        ld = hs;
        return buf;
    }
}

// Head (b, h) of x as fp32: x itself for fp32, else widened into buf (T * hs floats) and
// returned as a one-head view (row(b, h, t) = buf + t * hs for the b, h it was made for).
template <typename T>
Heads<const float> head_f32(const Heads<T>& x, int64_t b, int64_t h, int64_t T_len, int hs,
                            std::vector<float>& buf) {
    if constexpr (std::is_same_v<T, float>) {
        return {x.p, x.sb, x.st, x.sh};
    } else {
        buf.resize(T_len * hs);
        int64_t ld;
        rows_f32(x, b, h, 0, static_cast<int>(T_len), hs, buf.data(), ld);
        return {buf.data(), 0, hs, 0};
    }
}

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
    std::vector<float> qt, st, acc, kv;  // kv: a 16-bit key tile's K and V widened (else unused)
    std::vector<float> ft, frow;         // dropout factors (tile, one row)
    bool dot;  // the bf16 dot-product path: qp, kp, vp, pp hold its bf16 pairs (below)
    std::vector<std::uint32_t> qp, kp, vp, pp;
    vf m[BQ / 8], l[BQ / 8];
    FwdBuffers(int hs, bool widen_kv, bool dot)
        : qt(hs * BQ), st(BK * BQ), acc(BQ * hs), kv(widen_kv && !dot ? 2 * BK * hs : 0), ft(BK * BQ),
          frow(BK), dot(dot),
          qp(dot ? hs / 2 * BQ : 0), kp(dot ? BK * hs / 2 : 0), vp(dot ? BK / 2 * hs : 0), pp(dot ? BQ * BK / 2 : 0) {}
};

// P~ -> P~ * factor for the tile of queries i0.. (nq) and keys j0.. (nk) of head bh, after its
// sum went into l.
void apply_dropout(FwdBuffers& w, const DropoutParams& dropout, int64_t bh, int64_t T, int i0, int nq, int j0,
                   int nk) {
    dropout_tile(dropout, w.ft.data(), w.frow.data(), bh, T, i0, nq, j0, nk);
    for (int e = 0; e < nk * BQ; e += 8) storeu(&w.st[e], loadu(&w.st[e]) * loadu(&w.ft[e]));
}

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

// ----------------------------------------------------------------------------- bf16 dot products
// A "pair" is two bf16 in one 32-bit word, the lower-addressed (low half) first: vdpbf16ps
// multiplies the pairs of its two operands lane by lane and adds both products to the fp32
// lane. Operands are laid out so that a pair runs along the contraction index k.

inline std::uint32_t pair_at(const bf16* p) {  // p[0], p[1] (a row may be 2-byte aligned only)
    std::uint32_t w;
    std::memcpy(&w, p, sizeof w);
    return w;
}

inline std::uint32_t make_pair(float lo, float hi) {
    return from_float<bf16>(lo).bits | (static_cast<std::uint32_t>(from_float<bf16>(hi).bits) << 16);
}

#ifdef __AVX512BF16__
// Whether the bf16 forward takes the dot-product path: only where it pays. vdpbf16ps does 32
// multiply-adds per instruction against an fp32 FMA's 16; Zen 4 runs 512-bit FMAs at half rate
// (two 256-bit halves), so there the dot products double the matmul rate, but Intel Xeons issue
// two 512-bit FMAs per cycle and vdpbf16ps at one, and the pair packing costs extra: on a 2-core
// Xeon (AVX512-BF16, AMX hidden) the dot path ran 1.5-1.9x slower than widening to fp32
// (B=8 T=256 and B=4 T=1024, 12 heads of 64). NANOLM_CPU_BF16_DOT=1 or 0 forces it either way
// (the tests run both paths on any AVX512-BF16 CPU); read once.
bool cpu_has_bf16_dot() {
    static const bool use = [] {
        if (!__builtin_cpu_supports("avx512bf16")) return false;
        const char* force = std::getenv("NANOLM_CPU_BF16_DOT");
        if (force != nullptr && *force != '\0') return *force == '1';
        return static_cast<bool>(__builtin_cpu_is("amd"));
    }();
    return use;
}

// C[R rows][16 NV] += A B: A's row r is pairs A[r * lda + kp] (kp < KP), B is pair rows
// B[kp * ldb + n]; R x NV accumulators of 16 fp32 lanes stay in registers.
template <int R, int NV>
void gemm_pairs_rows(const std::uint32_t* A, int64_t lda, const std::uint32_t* B, int64_t ldb, float* C,
                     int64_t ldc, int KP) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(C + r * ldc + 16 * j);
    for (int kp = 0; kp < KP; ++kp) {
        __m512i b[NV];
        for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_si512(B + kp * ldb + 16 * j);
        for (int r = 0; r < R; ++r) {
            const __m512i a = _mm512_set1_epi32(static_cast<int>(A[r * lda + kp]));
            for (int j = 0; j < NV; ++j)
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b[j]));
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + r * ldc + 16 * j, acc[r][j]);
}

template <int NV>
void gemm_pairs_cols(const std::uint32_t* A, int64_t lda, const std::uint32_t* B, int64_t ldb, float* C,
                     int64_t ldc, int M, int KP) {
    int m = 0;
    for (; m + 4 <= M; m += 4) gemm_pairs_rows<4, NV>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, KP);
    for (; m < M; ++m) gemm_pairs_rows<1, NV>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, KP);
}

// C[M][N] += A[M][2 KP] B[2 KP][N] from pairs (N a multiple of 16), in 64-column panels:
// 4 rows x 4 vectors = 16 accumulators, well inside AVX-512's 32 registers.
void gemm_pairs(const std::uint32_t* A, int64_t lda, const std::uint32_t* B, int64_t ldb, float* C,
                int64_t ldc, int M, int KP, int N) {
    for (int n = 0; n < N; n += 64) {
        switch (std::min(4, (N - n) / 16)) {
            case 4: gemm_pairs_cols<4>(A, lda, B + n, ldb, C + n, ldc, M, KP); break;
            case 3: gemm_pairs_cols<3>(A, lda, B + n, ldb, C + n, ldc, M, KP); break;
            case 2: gemm_pairs_cols<2>(A, lda, B + n, ldb, C + n, ldc, M, KP); break;
            default: gemm_pairs_cols<1>(A, lda, B + n, ldb, C + n, ldc, M, KP); break;
        }
    }
}

// One key tile of the forward with bf16 dot products (see the file header).
template <bool kDropout>
void fwd_key_tile_dot(const Heads<bf16>& k, const Heads<bf16>& v, int64_t b, int64_t h, int64_t hk, int64_t T,
                      int64_t nh, int hs, int i0, int j0, int nk, int nq, float c, const DropoutParams& dropout,
                      FwdBuffers& w) {
    // K's rows are pairs along d already (copied for 4-byte alignment); B = qp, Q^T's pairs
    for (int r = 0; r < nk; ++r)
        for (int dp = 0; dp < hs / 2; ++dp) w.kp[r * (hs / 2) + dp] = pair_at(k.row(b, hk, j0 + r) + 2 * dp);
    std::fill(w.st.begin(), w.st.end(), 0.0f);
    gemm_pairs(w.kp.data(), hs / 2, w.qp.data(), BQ, w.st.data(), BQ, nk, hs / 2, BQ);  // S^T = K Q^T
    scale_and_mask(w.st.data(), nk, i0, j0, c);
    online_softmax_update(w, nk, hs);
    if constexpr (kDropout) apply_dropout(w, dropout, b * nh + h, T, i0, nq, j0, nk);
    const int kpairs = (nk + 1) / 2;  // an odd last key is paired with a zero
    for (int r = 0; r < nq; ++r)
        for (int cp = 0; cp < kpairs; ++cp) {
            const int c0 = 2 * cp, c1 = c0 + 1;
            w.pp[r * (BK / 2) + cp] = make_pair(w.st[c0 * BQ + r], c1 < nk ? w.st[c1 * BQ + r] : 0.0f);
        }
    for (int cp = 0; cp < kpairs; ++cp) {
        const bf16* v0 = v.row(b, hk, j0 + 2 * cp);
        const bf16* v1 = 2 * cp + 1 < nk ? v.row(b, hk, j0 + 2 * cp + 1) : nullptr;
        for (int d = 0; d < hs; ++d)
            w.vp[cp * hs + d] = v0[d].bits | (v1 ? static_cast<std::uint32_t>(v1[d].bits) << 16 : 0u);
    }
    gemm_pairs(w.pp.data(), BK / 2, w.vp.data(), hs, w.acc.data(), hs, nq, kpairs, hs);  // O += P V
}
#else
bool cpu_has_bf16_dot() { return false; }
#endif

template <typename E, bool kDropout>
void fwd_tile(const Heads<E>& q, const Heads<E>& k, const Heads<E>& v, E* o, float* lse, int64_t b,
              int64_t h, int64_t hk, int64_t T, int64_t nh, int hs, int i0, float c, const DropoutParams& dropout,
              FwdBuffers& w) {
    int nq = std::min<int64_t>(BQ, T - i0);
    std::fill(w.acc.begin(), w.acc.end(), 0.0f);
    for (int g = 0; g < BQ / 8; ++g) w.m[g] = splat(NEG_INF), w.l[g] = vf{};
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<E, bf16>) {
        if (w.dot) {  // Q^T as pairs along d: qp[dp][r] = (q[r][2dp], q[r][2dp + 1]), zero rows past nq
            for (int dp = 0; dp < hs / 2; ++dp)
                for (int r = 0; r < BQ; ++r) w.qp[dp * BQ + r] = r < nq ? pair_at(q.row(b, h, i0 + r) + 2 * dp) : 0u;
            for (int j0 = 0; j0 < i0 + nq; j0 += BK)
                fwd_key_tile_dot<kDropout>(k, v, b, h, hk, T, nh, hs, i0, j0, std::min(BK, i0 + nq - j0), nq,
                                           c, dropout, w);
        }
    }
#endif
    if (!w.dot) transpose(q.row(b, h, i0), q.st, nq, hs, w.qt.data(), BQ);
    for (int j0 = 0; j0 < (w.dot ? 0 : i0 + nq); j0 += BK) {
        int nk = std::min(BK, i0 + nq - j0);
        int64_t ldk, ldv;
        const float* kt = rows_f32(k, b, hk, j0, nk, hs, w.kv.data(), ldk);
        const float* vt = rows_f32(v, b, hk, j0, nk, hs, w.kv.data() + BK * hs, ldv);
        std::fill(w.st.begin(), w.st.end(), 0.0f);
        gemm(kt, ldk, w.qt.data(), BQ, w.st.data(), BQ, nk, hs, BQ);  // S^T = K Q^T
        scale_and_mask(w.st.data(), nk, i0, j0, c);
        online_softmax_update(w, nk, hs);
        if constexpr (kDropout) apply_dropout(w, dropout, b * nh + h, T, i0, nq, j0, nk);
        gemm<true>(w.st.data(), BQ, vt, ldv, w.acc.data(), hs, nq, nk, hs);  // O += P V
    }
    for (int r = 0; r < nq; ++r) {
        float l = w.l[r / 8][r % 8], m = w.m[r / 8][r % 8];
        E* out = o + ((b * T + i0 + r) * nh + h) * hs;
        for (int d = 0; d < hs; ++d) out[d] = from_float<E>(w.acc[r * hs + d] / l);
        lse[(b * nh + h) * T + i0 + r] = (m + std::log2(l)) * LN2;
    }
}

void check_sizes(const char* op, int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs) {
    require(B > 0 && T > 0 && nh > 0, std::string(op) + ": B, T, nh must be positive");
    require(nkv > 0 && nh % nkv == 0, std::string(op) + ": nkv must be positive and divide nh, got nh=" +
                                          std::to_string(nh) + " nkv=" + std::to_string(nkv));
    require(hs % 16 == 0 && hs >= 16 && hs <= 256,
            std::string(op) + ": hs must be a multiple of 16 in [16, 256], got " + std::to_string(hs));
}

}  // namespace

bool attention_cpu_bf16_dot() { return cpu_has_bf16_dot(); }

void attention_fwd_cpu(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                       std::uintptr_t lse, int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh, int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh, double scale, DType dtype,
                       const DropoutParams& dropout) {
    check_sizes("attention_fwd_cpu", B, T, nh, nkv, hs);
    const int64_t group = nh / nkv;
    const int64_t tiles = (T + BQ - 1) / BQ, tasks = B * nh * tiles;
    const float c = static_cast<float>(scale) * LOG2E;
    dispatch_cpu_dtype(dtype, "attention_fwd_cpu", [&](auto tag) {
        using E = decltype(tag);
        const Heads<E> Q{ptr<E>(q), sqb, sqt, sqh}, K{ptr<E>(k), skb, skt, skh}, V{ptr<E>(v), svb, svt, svh};
#pragma omp parallel
        {
            FwdBuffers w(static_cast<int>(hs), !std::is_same_v<E, float>, std::is_same_v<E, bf16> && cpu_has_bf16_dot());
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < tasks; ++task) {
                int64_t tile = tiles - 1 - task / (B * nh);  // longest (last) query tiles first
                int64_t bh = task % (B * nh);
                auto run = dropout.enabled ? fwd_tile<E, true> : fwd_tile<E, false>;
                run(Q, K, V, ptr<E>(o), ptr<float>(lse), bh / nh, bh % nh, bh % nh / group, T, nh, static_cast<int>(hs),
                    static_cast<int>(tile * BQ), c, dropout, w);
            }
        }
    });
}

namespace {

// Per-task buffers of the backward; qt, dot (Q^T, dO^T of one query head) are padded with zeros
// to whole tiles; dk, dv hold the K/V head's whole gradients (T rows) while its group's query
// heads add to them.
struct BwdBuffers {
    int64_t tp;  // T rounded up to a multiple of BQ
    std::vector<float> qt, dot, st, dpt, dk, dv, dq, lse2, delta, ft, frow;  // ft, frow: dropout factors
    std::vector<float> q32, k32, v32, do32;  // a 16-bit head's q, k, v, do widened (else unused)
    BwdBuffers(int hs, int64_t T)
        : tp((T + BQ - 1) / BQ * BQ), qt(hs * tp), dot(hs * tp), st(BK * BQ), dpt(BK * BQ),
          dk(T * hs), dv(T * hs), dq(T * hs), lse2(tp), delta(tp), ft(BK * BQ), frow(BK) {}
};

// One query tile's contribution (query head h) to key tile j0 (K/V head hk): dV, dK (of the key
// tile), dQ (of the query tile). Scores are formed transposed (keys x queries) from Q^T, dO^T made once per head.
using F32Heads = Heads<const float>;

template <bool kDropout>
void bwd_tile_pair(const F32Heads& q, const F32Heads& k, const F32Heads& v, const F32Heads& dout, int64_t b,
                   int64_t h, int64_t hk, int64_t T, int64_t nh, int hs, int i0, int j0, int nk, float c,
                   const DropoutParams& dropout, BwdBuffers& w) {
    int nq = std::min<int64_t>(BQ, T - i0);
    const float* do0 = dout.row(b, h, i0);
    std::fill(w.st.begin(), w.st.end(), 0.0f);
    gemm(k.row(b, hk, j0), k.st, w.qt.data() + i0, w.tp, w.st.data(), BQ, nk, hs, BQ);    // S^T
    std::fill(w.dpt.begin(), w.dpt.end(), 0.0f);
    gemm(v.row(b, hk, j0), v.st, w.dot.data() + i0, w.tp, w.dpt.data(), BQ, nk, hs, BQ);  // dP^T
    scale_and_mask(w.st.data(), nk, i0, j0, c);
    if constexpr (kDropout) dropout_tile(dropout, w.ft.data(), w.frow.data(), b * nh + h, T, i0, nq, j0, nk);
    for (int col = 0; col < nk; ++col) {
        for (int r = 0; r < BQ; r += 8) {
            float* s = &w.st[col * BQ + r];
            float* dp = &w.dpt[col * BQ + r];
            vf p = exp2v(loadu(s) - loadu(&w.lse2[i0 + r]));
            if constexpr (kDropout) {
                vf f = loadu(&w.ft[col * BQ + r]);
                storeu(s, p * f);                                            // Pd^T
                storeu(dp, p * (loadu(dp) * f - loadu(&w.delta[i0 + r])));  // dS^T
            } else {
                storeu(s, p);                                          // P^T
                storeu(dp, p * (loadu(dp) - loadu(&w.delta[i0 + r])));  // dS^T = P^T (dP^T - delta)
            }
        }
    }
    gemm(w.st.data(), BQ, do0, dout.st, w.dv.data() + j0 * hs, hs, nk, nq, hs);            // dV += P^T dO
    gemm(w.dpt.data(), BQ, q.row(b, h, i0), q.st, w.dk.data() + j0 * hs, hs, nk, nq, hs);  // dK += dS^T Q
    gemm<true>(w.dpt.data(), BQ, k.row(b, hk, j0), k.st, w.dq.data() + i0 * hs, hs, nq, nk, hs);  // dQ += dS K
}

template <typename T>
void store_rows(const float* src, int rows, int hs, float factor, const Heads<T>& dst, int64_t b,
                int64_t h, int64_t t0) {
    for (int r = 0; r < rows; ++r) {
        T* out = dst.row(b, h, t0 + r);
        for (int d = 0; d < hs; ++d) out[d] = from_float<T>(src[r * hs + d] * factor);
    }
}

// Query head h's contribution to its K/V head hk's dK, dV (w.dk, w.dv, in fp32), and its dQ.
template <typename E, bool kDropout>
void bwd_query_head(const Heads<E>& q_in, const Heads<E>& dout_in, const F32Heads& k, const F32Heads& v,
                    const Heads<E>& o, const float* lse, const Heads<E>& dq, int64_t b, int64_t h, int64_t hk,
                    int64_t T, int64_t nh, int hs, float scale, const DropoutParams& dropout, BwdBuffers& w) {
    const int Ti = static_cast<int>(T);
    const F32Heads q = head_f32(q_in, b, h, T, hs, w.q32), dout = head_f32(dout_in, b, h, T, hs, w.do32);
    std::fill(w.lse2.begin(), w.lse2.end(), 0.0f);  // padding queries: finite values, never used
    std::fill(w.delta.begin(), w.delta.end(), 0.0f);
    for (int64_t t = 0; t < T; ++t) {
        const float* dor = dout.row(b, h, t);
        const E* orow = o.row(b, h, t);
        float acc = 0.0f;
        for (int d = 0; d < hs; ++d) acc += dor[d] * to_float(orow[d]);
        w.delta[t] = acc;
        w.lse2[t] = lse[(b * nh + h) * T + t] * LOG2E;
    }
    transpose(q.row(b, h, 0), q.st, Ti, hs, w.qt.data(), w.tp);
    transpose(dout.row(b, h, 0), dout.st, Ti, hs, w.dot.data(), w.tp);
    std::fill(w.dq.begin(), w.dq.end(), 0.0f);
    const float c = scale * LOG2E;
    for (int j0 = 0; j0 < T; j0 += BK) {
        int nk = std::min<int64_t>(BK, T - j0);
        for (int i0 = j0; i0 < T; i0 += BQ)
            bwd_tile_pair<kDropout>(q, k, v, dout, b, h, hk, T, nh, hs, i0, j0, nk, c, dropout, w);
    }
    store_rows(w.dq.data(), Ti, hs, scale, dq, b, h, 0);
}

// K/V head (b, hk): its K, V widened once, then its group's query heads in order.
template <typename E, bool kDropout>
void bwd_kv_head(const Heads<E>& q, const Heads<E>& k_in, const Heads<E>& v_in, const Heads<E>& dout,
                 const Heads<E>& o, const float* lse, const Heads<E>& dq, const Heads<E>& dk, const Heads<E>& dv,
                 int64_t b, int64_t hk, int64_t T, int64_t nh, int64_t group, int hs, float scale,
                 const DropoutParams& dropout, BwdBuffers& w) {
    const F32Heads k = head_f32(k_in, b, hk, T, hs, w.k32), v = head_f32(v_in, b, hk, T, hs, w.v32);
    std::fill(w.dk.begin(), w.dk.end(), 0.0f);
    std::fill(w.dv.begin(), w.dv.end(), 0.0f);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
        bwd_query_head<E, kDropout>(q, dout, k, v, o, lse, dq, b, h, hk, T, nh, hs, scale, dropout, w);
    store_rows(w.dk.data(), static_cast<int>(T), hs, scale, dk, b, hk, 0);
    store_rows(w.dv.data(), static_cast<int>(T), hs, 1.0f, dv, b, hk, 0);
}

}  // namespace

void attention_bwd_cpu(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t o, std::uintptr_t lse, std::uintptr_t dq, std::uintptr_t dk,
                       std::uintptr_t dv, int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh, int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh, int64_t sdqb, int64_t sdqt,
                       int64_t sdqh, int64_t sdkb, int64_t sdkt, int64_t sdkh, int64_t sdvb,
                       int64_t sdvt, int64_t sdvh, double scale, DType dtype, const DropoutParams& dropout) {
    check_sizes("attention_bwd_cpu", B, T, nh, nkv, hs);
    dispatch_cpu_dtype(dtype, "attention_bwd_cpu", [&](auto tag) {
        using E = decltype(tag);
        const int64_t so_t = nh * hs, so_b = T * so_t;  // o and do: contiguous (B, T, nh, hs)
        const Heads<E> Q{ptr<E>(q), sqb, sqt, sqh}, K{ptr<E>(k), skb, skt, skh}, V{ptr<E>(v), svb, svt, svh},
            DO{ptr<E>(dout), so_b, so_t, hs}, O{ptr<E>(o), so_b, so_t, hs}, DQ{ptr<E>(dq), sdqb, sdqt, sdqh},
            DK{ptr<E>(dk), sdkb, sdkt, sdkh}, DV{ptr<E>(dv), sdvb, sdvt, sdvh};
#pragma omp parallel
        {
            BwdBuffers w(static_cast<int>(hs), T);
#pragma omp for schedule(dynamic, 1)
            for (int64_t bg = 0; bg < B * nkv; ++bg) {
                auto run = dropout.enabled ? bwd_kv_head<E, true> : bwd_kv_head<E, false>;
                run(Q, K, V, DO, O, ptr<const float>(lse), DQ, DK, DV, bg / nkv, bg % nkv, T, nh, nh / nkv,
                    static_cast<int>(hs), static_cast<float>(scale), dropout, w);
            }
        }
    });
}

}  // namespace nanolm
