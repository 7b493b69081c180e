// Dropout masks by Philox4x32-10: the C++ and CUDA form of the specification in
// nanolm/ops/dropout.py, which every backend matches bit for bit:
//   key (seed mod 2^32, seed >> 32); counter (g mod 2^32, g >> 32, offset mod 2^32, offset >> 32)
//   with g = i >> 2 for element i (its flat row-major index); element i takes word i mod 4 of
//   Philox's output and is kept iff that word >= threshold = floor(p * 2^32); kept values are
//   multiplied by scale = 1 / (1 - p) (float32), dropped ones by 0.
// Cost: one Philox call (10 rounds of 2 32x32->64-bit multiplies and 4 xors) per 4 elements
// when consecutive elements are generated together (dropout_factors), per element otherwise.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define NANOLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NANOLM_HOST_DEVICE inline
#endif

namespace nanolm {

// A kernel's dropout arguments, from the host (nanolm/ops/launch.py: Target.dropout).
// enabled == false (p = 0) selects the kernel's code path without dropout.
struct DropoutParams {
    std::uint64_t seed = 0;
    std::uint64_t offset = 0;
    std::uint32_t threshold = 0;  // floor(p * 2^32): a word below it drops its element
    float scale = 1.f;            // 1 / (1 - p)
    bool enabled = false;
};

struct Philox4 {
    std::uint32_t w[4];
};

NANOLM_HOST_DEVICE void mulhilo32(std::uint32_t a, std::uint32_t m, std::uint32_t& hi, std::uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    hi = __umulhi(a, m);
    lo = a * m;
#else
    const std::uint64_t product = static_cast<std::uint64_t>(a) * m;
    hi = static_cast<std::uint32_t>(product >> 32);
    lo = static_cast<std::uint32_t>(product);
#endif
}

// Philox4x32-10 of counter (group, offset) under key seed (Salmon et al., SC'11).
NANOLM_HOST_DEVICE Philox4 philox4x32_10(std::uint64_t group, std::uint64_t offset, std::uint64_t seed) {
    std::uint32_t c0 = static_cast<std::uint32_t>(group), c1 = static_cast<std::uint32_t>(group >> 32);
    std::uint32_t c2 = static_cast<std::uint32_t>(offset), c3 = static_cast<std::uint32_t>(offset >> 32);
    std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        std::uint32_t hi0, lo0, hi1, lo1;
        mulhilo32(c0, 0xD2511F53u, hi0, lo0);
        mulhilo32(c2, 0xCD9E8D57u, hi1, lo1);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return {{c0, c1, c2, c3}};
}

// Word j of r, by selects rather than a dynamic index (which would put r in CUDA local memory).
NANOLM_HOST_DEVICE std::uint32_t philox_word(const Philox4& r, std::uint32_t j) {
    return j == 0 ? r.w[0] : j == 1 ? r.w[1] : j == 2 ? r.w[2] : r.w[3];
}

// The factor (scale or 0) of element `index`: one Philox call for one element.
NANOLM_HOST_DEVICE float dropout_factor(const DropoutParams& d, std::uint64_t index) {
    const Philox4 r = philox4x32_10(index >> 2, d.offset, d.seed);
    return philox_word(r, static_cast<std::uint32_t>(index & 3)) >= d.threshold ? d.scale : 0.f;
}

// The factors of the VEC consecutive elements first, first + 1, ...; with VEC a multiple of 4,
// first must be one too (a vectorized row piece) and each Philox call serves 4 elements.
template <int VEC>
NANOLM_HOST_DEVICE void dropout_factors_pack(const DropoutParams& d, std::uint64_t first, float (&f)[VEC]) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int g = 0; g < VEC; g += 4) {
            const Philox4 r = philox4x32_10((first + g) >> 2, d.offset, d.seed);
#pragma unroll
            for (int j = 0; j < 4; ++j) f[g + j] = r.w[j] >= d.threshold ? d.scale : 0.f;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = dropout_factor(d, first + k);
    }
}

// The factors of the n consecutive elements first, first + 1, ...: one Philox call per group.
inline void dropout_factors(const DropoutParams& d, std::uint64_t first, std::int64_t n, float* out) {
    std::int64_t i = 0;
    while (i < n) {
        const std::uint64_t index = first + static_cast<std::uint64_t>(i);
        const Philox4 r = philox4x32_10(index >> 2, d.offset, d.seed);
        for (std::uint32_t j = static_cast<std::uint32_t>(index & 3); j < 4 && i < n; ++j, ++i)
            out[i] = r.w[j] >= d.threshold ? d.scale : 0.f;
    }
}

}  // namespace nanolm
