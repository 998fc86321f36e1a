// Matrix-vector products on int8 (q8_0) and int4 (q4_0) weight blocks, for the C++ decode step.
//
// Decoding a token reads every weight once, so at batch 1 its speed is the bytes of weights per
// token: 1.06 bytes per value in q8_0 blocks of 32, 0.56 in q4_0, against 4 in float32. These
// products read the blocks as they are stored (slmkit.quant, GGUF's layout) and never unpack them
// to float. As in llama.cpp's q8_0 x q8_0 and q4_0 x q8_0 dots, each activation row is quantized
// once per product to int8 blocks of 32 (quantize_rows), so a block of 32 products is integer math:
//
//   AVX-512 VNNI  vpdpbusd on 256-bit registers (AVX512VL), 4 byte products per int32 lane;
//   AVX-VNNI      the same instruction in its VEX form (AVX2 laptops since Alder Lake);
//   AVX2          vpmaddubsw + vpmaddwd (the u8 x s8 pairs cannot saturate: |w|, |x| <= 128, 127);
//   scalar        the reference, and what ARM builds run.
//
// Every one of them gives, for a block a, the same eight int32 lane sums p[l] = sum of w[e] x[e]
// over e = 4l..4l+3 (exact integers), then one float accumulation acc[l] = fma(d_w * d_x, p[l],
// acc[l]) over the blocks in order, and the same reduction of the eight lanes at the end. So the
// instruction set never changes a result, nor does the thread count (decode.cpp gives each output
// to one task). The signed x signed byte products use the sign trick (|w| as unsigned times x with
// w's sign), exact for every int8 weight including -128.
#include "qdecode.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#define SLMQ_X86 1
#include <immintrin.h>
// AVX-VNNI's intrinsics came with GCC 11 and Clang 12: older compilers build the others.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define SLMQ_AVXVNNI_BUILT 1
#endif
#endif

namespace slmq {
namespace {

constexpr int64_t kBlock = 32;  // activation block: 32 int8 values and a float scale

// float16 bits to float32, exactly (normal, subnormal, zero, inf, nan).
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: value man * 2^-24
        float f = (float)man * (1.0f / 16777216.0f);
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t half_bits(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

inline int64_t group_of(int64_t fmt) { return fmt >> 8; }
inline int64_t block_bytes(int kind, int64_t group) { return 2 + (kind == kQ8 ? group : group / 2); }

// The 32 signed weights of activation block s inside one weight block (q: the block's values).
inline void weights_of(int kind, int64_t group, const uint8_t* q, int64_t s, int8_t* w) {
    if (kind == kQ8) {
        std::memcpy(w, q + s * kBlock, kBlock);
    } else if (group == kBlock) {  // 16 bytes: elements 0..15 low nibbles, 16..31 high
        for (int i = 0; i < 16; i++) w[i] = (int8_t)((q[i] & 15) - 8), w[i + 16] = (int8_t)((q[i] >> 4) - 8);
    } else {  // group / 2 bytes: elements 0..group/2-1 low nibbles, the rest high
        const int64_t chunks = group / 64, chunk = s % chunks, shift = 4 * (s / chunks);
        for (int i = 0; i < 32; i++) w[i] = (int8_t)(((q[chunk * 32 + i] >> shift) & 15) - 8);
    }
}

inline float reduce8(const float* v) {  // the order of decode.cpp's hsum256 and of hsum8 below
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

struct Act {  // quantize_rows's buffer
    const float* d;  // (B, in / 32) scales
    const int8_t* q;  // (B, in) values
    int64_t nb, in;
};

Act act_of(const void* xq, int64_t B, int64_t in) {
    const int64_t nb = in / kBlock;
    const int64_t head = (B * nb * (int64_t)sizeof(float) + 63) / 64 * 64;
    return Act{(const float*)xq, (const int8_t*)xq + head, nb, in};
}

void matvec_scalar(int kind, int64_t group, const uint8_t* W, Act x, int64_t B, int64_t j0, int64_t j1,
                   float* dots, int64_t ldd) {
    const int64_t bb = block_bytes(kind, group), sub = group / kBlock, nbw = x.in / group, rowb = nbw * bb;
    int8_t w[kBlock];
    for (int64_t j = j0; j < j1; j++)
        for (int64_t b = 0; b < B; b++) {
            float acc[8] = {};
            for (int64_t g = 0; g < nbw; g++) {
                const uint8_t* blk = W + j * rowb + g * bb;
                const float dw = half_to_float(half_bits(blk));
                for (int64_t s = 0; s < sub; s++) {
                    const int64_t a = g * sub + s;
                    weights_of(kind, group, blk + 2, s, w);
                    const int8_t* xa = x.q + b * x.in + a * kBlock;
                    const float sc = dw * x.d[b * x.nb + a];
                    for (int l = 0; l < 8; l++) {
                        int32_t p = 0;
                        for (int i = 4 * l; i < 4 * l + 4; i++) p += (int32_t)w[i] * (int32_t)xa[i];
                        acc[l] = std::fma(sc, (float)p, acc[l]);
                    }
                }
            }
            dots[b * ldd + (j - j0)] = reduce8(acc);
        }
}

#if defined(SLMQ_X86)
#define SLMQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SLMQ_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define SLMQ_VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

SLMQ_AVX2 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

SLMQ_AVX2 inline float half_avx(const uint8_t* p) { return _cvtsh_ss(half_bits(p)); }

// The 32 signed weights of block s (see weights_of) in one register.
template <int KIND>
SLMQ_AVX2 inline __m256i wblock(const uint8_t* q, int64_t group, int64_t s) {
    if (KIND == kQ8) return _mm256_loadu_si256((const __m256i*)(q + s * kBlock));
    const __m256i low4 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    if (group == kBlock) {
        const __m128i b = _mm_loadu_si128((const __m128i*)q);
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
        return _mm256_sub_epi8(_mm256_and_si256(both, low4), eight);
    }
    const int64_t chunks = group / 64, chunk = s % chunks;
    __m256i b = _mm256_loadu_si256((const __m256i*)(q + chunk * 32));
    if (s >= chunks) b = _mm256_srli_epi16(b, 4);
    return _mm256_sub_epi8(_mm256_and_si256(b, low4), eight);
}

// The eight int32 lane sums of w . x, three ways.
SLMQ_AVX2 inline __m256i idot_avx2(__m256i w, __m256i x) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#if defined(SLMQ_AVXVNNI_BUILT)
SLMQ_AVXVNNI inline __m256i idot_avxvnni(__m256i w, __m256i x) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}
#endif
SLMQ_VNNI512 inline __m256i idot_vnni512(__m256i w, __m256i x) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}

// R weight rows x BB activation rows: each weight block is loaded and unpacked once for the BB rows.
#define SLMQ_KERNEL(NAME, ATTR, IDOT)                                                                          \
    template <int KIND, int R, int BB>                                                                         \
    ATTR inline void NAME##_tile(const uint8_t* W, int64_t rowb, int64_t group, Act x, float* dots, int64_t ldd) { \
        const int64_t bb = block_bytes(KIND, group), sub = group / kBlock, nbw = x.in / group;                 \
        __m256 acc[R][BB];                                                                                     \
        for (int r = 0; r < R; r++)                                                                            \
            for (int b = 0; b < BB; b++) acc[r][b] = _mm256_setzero_ps();                                      \
        for (int64_t g = 0; g < nbw; g++) {                                                                    \
            float dw[R];                                                                                       \
            for (int r = 0; r < R; r++) dw[r] = half_avx(W + r * rowb + g * bb);                               \
            for (int64_t s = 0; s < sub; s++) {                                                                \
                const int64_t a = g * sub + s;                                                                 \
                __m256i w[R];                                                                                  \
                for (int r = 0; r < R; r++) w[r] = wblock<KIND>(W + r * rowb + g * bb + 2, group, s);          \
                for (int b = 0; b < BB; b++) {                                                                 \
                    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q + b * x.in + a * kBlock));      \
                    const float dx = x.d[b * x.nb + a];                                                        \
                    for (int r = 0; r < R; r++)                                                                \
                        acc[r][b] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx),                                \
                                                    _mm256_cvtepi32_ps(IDOT(w[r], xv)), acc[r][b]);            \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < R; r++)                                                                            \
            for (int b = 0; b < BB; b++) dots[b * ldd + r] = hsum8(acc[r][b]);                                 \
    }                                                                                                          \
    template <int KIND, int BB>                                                                                \
    ATTR void NAME##_rows(const uint8_t* W, int64_t rowb, int64_t group, Act x, int64_t j0, int64_t j1,        \
                          float* dots, int64_t ldd) {                                                          \
        int64_t j = j0;                                                                                        \
        for (; j + 4 <= j1; j += 4) NAME##_tile<KIND, 4, BB>(W + j * rowb, rowb, group, x, dots + (j - j0), ldd); \
        for (; j < j1; j++) NAME##_tile<KIND, 1, BB>(W + j * rowb, rowb, group, x, dots + (j - j0), ldd);     \
    }                                                                                                          \
    template <int KIND>                                                                                        \
    ATTR void NAME(const uint8_t* W, int64_t group, Act x, int64_t B, int64_t j0, int64_t j1, float* dots,     \
                   int64_t ldd) {                                                                              \
        const int64_t rowb = x.in / group * block_bytes(KIND, group);                                          \
        for (int64_t b = 0; b < B;) {                                                                          \
            Act xb{x.d + b * x.nb, x.q + b * x.in, x.nb, x.in};                                                \
            float* d = dots + b * ldd;                                                                         \
            switch (std::min<int64_t>(B - b, 4)) {                                                             \
                case 4: NAME##_rows<KIND, 4>(W, rowb, group, xb, j0, j1, d, ldd); b += 4; break;               \
                case 3: NAME##_rows<KIND, 3>(W, rowb, group, xb, j0, j1, d, ldd); b += 3; break;               \
                case 2: NAME##_rows<KIND, 2>(W, rowb, group, xb, j0, j1, d, ldd); b += 2; break;               \
                default: NAME##_rows<KIND, 1>(W, rowb, group, xb, j0, j1, d, ldd); b += 1; break;              \
            }                                                                                                  \
        }                                                                                                      \
    }

SLMQ_KERNEL(mv_avx2, SLMQ_AVX2, idot_avx2)
#if defined(SLMQ_AVXVNNI_BUILT)
SLMQ_KERNEL(mv_avxvnni, SLMQ_AVXVNNI, idot_avxvnni)
#endif
SLMQ_KERNEL(mv_vnni512, SLMQ_VNNI512, idot_vnni512)
#undef SLMQ_KERNEL
#endif

bool has(const char* feature) {
#if defined(SLMQ_X86)
    __builtin_cpu_init();
    if (!std::strcmp(feature, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#if defined(SLMQ_AVXVNNI_BUILT)
    if (!std::strcmp(feature, "avxvnni")) return __builtin_cpu_supports("avxvnni") && has("avx2");
#endif
    if (!std::strcmp(feature, "avx512vnni"))
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512bw") && has("avx2");
#endif
    (void)feature;
    return false;
}

}  // namespace

// Kernels: 1 scalar, 2 AVX2 (maddubs), 3 AVX-VNNI, 4 AVX-512 VNNI.
bool kernel_available(int kernel) {
    static const bool avx2 = has("avx2"), avxvnni = has("avxvnni"), vnni512 = has("avx512vnni");
    switch (kernel) {
        case 1: return true;
        case 2: return avx2;
        case 3: return avxvnni;
        case 4: return vnni512;
        default: return false;
    }
}

// decode.cpp's instruction set (1 scalar, 2 AVX2, 3 AVX-512) -> the best kernel within it.
int kernel_for_isa(int isa) {
    if (isa >= 3 && kernel_available(4)) return 4;
    if (isa >= 2 && kernel_available(3)) return 3;
    if (isa >= 2 && kernel_available(2)) return 2;
    return 1;
}

void run_kernel(int kernel, int64_t fmt, const void* W, int64_t in, const void* xq, int64_t B, int64_t j0, int64_t j1,
                float* dots, int64_t ldd) {
    const int kind = kind_of(fmt);
    const int64_t group = group_of(fmt);
    const Act x = act_of(xq, B, in);
    const uint8_t* w = (const uint8_t*)W;
#if defined(SLMQ_X86)
#define SLMQ_RUN(NAME)                                                                 \
    if (kind == kQ8) NAME<kQ8>(w, group, x, B, j0, j1, dots, ldd);                     \
    else NAME<kQ4>(w, group, x, B, j0, j1, dots, ldd);                                 \
    return;
    if (kernel == 4) { SLMQ_RUN(mv_vnni512) }
#if defined(SLMQ_AVXVNNI_BUILT)
    if (kernel == 3) { SLMQ_RUN(mv_avxvnni) }
#endif
    if (kernel == 2) { SLMQ_RUN(mv_avx2) }
#undef SLMQ_RUN
#endif
    (void)kernel;
    matvec_scalar(kind, group, w, x, B, j0, j1, dots, ldd);
}

int64_t xq_bytes(int64_t B, int64_t in) {
    return (B * (in / kBlock) * (int64_t)sizeof(float) + 63) / 64 * 64 + B * in;
}

void quantize_rows(const float* X, int64_t in, int64_t ldx, int64_t B, void* xq) {
    const int64_t nb = in / kBlock;
    const int64_t head = (B * nb * (int64_t)sizeof(float) + 63) / 64 * 64;
    float* d = (float*)xq;
    int8_t* q = (int8_t*)xq + head;
    for (int64_t b = 0; b < B; b++)
        for (int64_t a = 0; a < nb; a++) {
            const float* x = X + b * ldx + a * kBlock;
            float m = 0.f;
            for (int i = 0; i < kBlock; i++) m = std::max(m, std::fabs(x[i]));
            const float scale = m / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
            d[b * nb + a] = scale;
            int8_t* o = q + b * in + a * kBlock;
            for (int i = 0; i < kBlock; i++) o[i] = (int8_t)std::nearbyint(x[i] * inv);
        }
}

void matvec(int64_t fmt, int isa, const void* W, int64_t in, const void* xq, int64_t B, int64_t j0, int64_t j1,
            float* dots, int64_t ldd) {
    run_kernel(kernel_for_isa(isa), fmt, W, in, xq, B, j0, j1, dots, ldd);
}

void dequantize_row(int64_t fmt, const void* W, int64_t in, int64_t row, float* out) {
    const int kind = kind_of(fmt);
    const int64_t group = group_of(fmt), bb = block_bytes(kind, group), sub = group / kBlock;
    const uint8_t* r = (const uint8_t*)W + row * (in / group) * bb;
    int8_t w[kBlock];
    for (int64_t g = 0; g < in / group; g++) {
        const float d = half_to_float(half_bits(r + g * bb));
        for (int64_t s = 0; s < sub; s++) {
            weights_of(kind, group, r + g * bb + 2, s, w);
            for (int i = 0; i < kBlock; i++) out[g * group + s * kBlock + i] = (float)w[i] * d;
        }
    }
}

}  // namespace slmq

extern "C" {

// For tests and benchmarks: out (B, rows) = W . X^T for a packed W (format fmt, rows x in) and
// float X (B, in), X quantized as the decode step does, with kernel 0 (best), 1 scalar, 2 AVX2,
// 3 AVX-VNNI, 4 AVX-512 VNNI. Returns 0, or 2 when this CPU lacks the kernel, 3 for a bad format.
int slm_qmatvec(int64_t fmt, int kernel, const void* W, int64_t rows, int64_t in, const float* X, int64_t B,
                float* out) {
    const int64_t group = fmt >> 8;
    if (!slmq::quantized(fmt) || group <= 0 || group % 32 || in % group) return 3;
    if (kernel == 0) kernel = slmq::kernel_for_isa(3);
    if (!slmq::kernel_available(kernel)) return 2;
    void* xq = std::malloc(slmq::xq_bytes(B, in));
    slmq::quantize_rows(X, in, in, B, xq);
    slmq::run_kernel(kernel, fmt, W, in, xq, B, 0, rows, out, rows);
    std::free(xq);
    return 0;
}

// The kernel the decode step uses for decode.cpp's isa (1 scalar, 2 AVX2, 3 AVX-512): 1-4 as above.
int slm_qmatvec_kernel(int isa) { return slmq::kernel_for_isa(isa); }

}  // extern "C"
