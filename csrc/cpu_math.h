// Float math for the CPU kernels' inner loops that gcc vectorizes under its default flags
// (-O3, no -ffast-math): libm's expf is a scalar call there, and a float compare or select does
// not vectorize under -ftrapping-math, so these are written with integer bit operations.
#pragma once
#include <algorithm>
#include <cstdint>

namespace nanolm {

// exp(x) for x <= 0 (e.g. x minus its row max), relative error ~2e-7: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor polynomial. x is clamped at -87 so 2^n
// stays a normal float (exp(-87) ~ 2e-38, and exp(-inf) gives that, not NaN). The clamp is an
// unsigned min on the bits (a float <= 0 grows in magnitude as its bits grow): gcc will not
// vectorize a float compare under the default -ftrapping-math. Branch-free, so it vectorizes.
inline float exp_nonpositive(float x) {
    x = __builtin_bit_cast(float, std::min(__builtin_bit_cast(std::uint32_t, x), 0xC2AE0000u));  // -87.f
    // round to nearest by adding 1.5 * 2^23 (std::nearbyint does not vectorize with gcc 12)
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi/lo
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    return p * __builtin_bit_cast(float, (static_cast<std::int32_t>(n) + 127) << 23);
}

// sigmoid(x) = 1 / (1 + exp(-x)) from e = exp(-|x|) <= 1, which never overflows: 1 / (1 + e) for
// x >= 0, e / (1 + e) for x < 0. The sign picks the numerator through an integer mask.
inline float sigmoid(float x) {
    const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, x);
    const float e = exp_nonpositive(__builtin_bit_cast(float, bits | 0x80000000u));  // -|x|
    const std::uint32_t negative = static_cast<std::uint32_t>(static_cast<std::int32_t>(bits) >> 31);
    const std::uint32_t numerator = (__builtin_bit_cast(std::uint32_t, e) & negative) |
                                    (__builtin_bit_cast(std::uint32_t, 1.f) & ~negative);
    return __builtin_bit_cast(float, numerator) / (1.f + e);
}

// max(x, 0) by the sign bit: a negative x (its sign bit set) becomes +0.
inline float relu(float x) {
    const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, x);
    return __builtin_bit_cast(float, bits & ~static_cast<std::uint32_t>(static_cast<std::int32_t>(bits) >> 31));
}

}  // namespace nanolm
