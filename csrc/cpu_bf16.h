// 16-bit storage for the CPU kernels: the element types they are templated on (float, bf16,
// and fp16 as the compiler's _Float16).
//
// The CPU kernels keep every statistic and accumulator in fp32 and use bf16/fp16 only for what
// they read and write, as the CUDA and Triton kernels do. bf16 is the top half of an fp32:
// widening is a 16-bit shift; narrowing rounds to nearest even. Both are integer code, so gcc
// vectorizes the loops that call them (a float compare would not vectorize under
// -ftrapping-math). fp16 converts with the compiler's _Float16 casts (F16C instructions with
// -march=native on x86), rounding to nearest even.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "common.h"

namespace nanolm {

struct bf16 {
    std::uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(_Float16 x) { return static_cast<float>(x); }
inline float to_float(bf16 x) { return __builtin_bit_cast(float, static_cast<std::uint32_t>(x.bits) << 16); }

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) { return x; }

template <>
inline _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }

// Round to nearest even: add 0x7fff plus the lowest kept bit, then drop the low half. A NaN
// stays a (quiet) NaN instead of rounding into infinity.
template <>
inline bf16 from_float<bf16>(float x) {
    const std::uint32_t u = __builtin_bit_cast(std::uint32_t, x);
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return bf16{static_cast<std::uint16_t>(nan ? 0x7fc0u : rounded)};
}

// dst[i] = float(src[i]); for T = float the caller usually reads src in place instead.
template <typename T>
inline void widen(const T* __restrict src, float* __restrict dst, std::int64_t n) {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void narrow(const float* __restrict src, T* __restrict dst, std::int64_t n) {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

#ifdef __F16C__
// fp16: gcc 12 does not vectorize the _Float16 casts above (one vcvtsh2ss per value, 6x slower
// than the bf16 loops), so 8 at a time with F16C; the same round-to-nearest-even, bit for bit.
template <>
inline void widen<_Float16>(const _Float16* __restrict src, float* __restrict dst, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = to_float(src[i]);
}

template <>
inline void narrow<_Float16>(const float* __restrict src, _Float16* __restrict dst, std::int64_t n) {
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) dst[i] = from_float<_Float16>(src[i]);
}
#endif

// Calls fn with a value of the element type `dtype` names (float, bf16, _Float16), for dispatch.
template <typename Fn>
inline void dispatch_cpu_dtype(DType dtype, const char* op, Fn&& fn) {
    switch (dtype) {
        case DType::float32: return fn(float{});
        case DType::bfloat16: return fn(bf16{});
        case DType::float16: return fn(_Float16{});
    }
    unsupported_dtype(op, dtype);
}

}  // namespace nanolm
