// The vector helpers shared by slmkit's CPU kernels: W floats as a GCC/Clang vector extension
// type, one register of the instruction set the file is compiled for: 16 floats (a zmm register)
// where AVX-512 is on, 8 elsewhere (a ymm register on AVX2, two q registers on NEON). W follows
// the compile flags, not the machine: slmkit/cpu_kernels.py builds the library once per
// instruction-set level (-march=native where it has AVX-512, -march=x86-64-v3 for AVX2), and 16-float
// vectors on AVX2 were lowered partly to scalar code (6-10x slower).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return x - vf{}; }  // x - 0 is x exactly, so this folds to a broadcast
// Lane-wise choice (C++ vector ?:, GCC and Clang): one compare-and-blend, where and/or/andnot took three.
inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vi lane_index() { vi v; for (int i = 0; i < W; i++) v[i] = i; return v; }

// exp(x) for x <= 0 (scores minus their row maximum), Cephes' expf polynomial (about 1 ulp).
// Lanes below -80 (and -inf, the masked ones) come back as 0: e^-80 is nothing next to the row's
// largest term, and letting them through would feed denormals to the backward pass.
inline vf vexp(vf x) {
    const vi keep = x >= splat(-80.f);
    x = vmax(x, splat(-87.f));
#if defined(__AVX512F__)  // one rounding instruction
    const vf n = (vf)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const vf n = (x * splat(1.44269504088896341f) + magic) - magic;
#endif
    const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    // Estrin's scheme: the same polynomial as Horner's, in half the dependent steps.
    const vf r2 = r * r, r4 = r2 * r2;
    const vf a = splat(5.0000001201e-1f) + r * splat(1.6666665459e-1f);
    const vf b = splat(4.1665795894e-2f) + r * splat(8.3334519073e-3f);
    const vf c = splat(1.3981999507e-3f) + r * splat(1.9875691500e-4f);
    const vf p = (a + r2 * b + r4 * c) * r2 + r + splat(1.f);
#if defined(__AVX512F__)  // p * 2^n in one instruction
    return select(keep, (vf)_mm512_scalef_ps((__m512)p, (__m512)n), splat(0.f));
#else
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return select(keep, p * (vf)bits, splat(0.f));
#endif
}

inline float hsum(vf v) {
    float t = 0.f;
    for (int i = 0; i < W; i++) t += v[i];
    return t;
}

inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; i++) m = v[i] > m ? v[i] : m;
    return m;
}

}  // namespace
