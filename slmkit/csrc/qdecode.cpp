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
#include <vector>

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

// The panel layout the products read (slm_qpack makes it from slm quantize's blocks, once, when a
// decoder is made). Rows in panels of kPanel = 16; a panel holds, for each activation block a of 32
// columns in turn: the 16 rows' scales (float16; a group of 64 or 128 repeats its scale for each
// of its 32-column blocks), then their values, four bytes of a row side by side so that one 64-byte
// register holds, for 16 rows, the four weights that meet the same four activations:
//   q8: 8 registers, byte [l][r][i] = w[r][4l + i] + 128 (unsigned: VNNI's operand order);
//   q4: 4 registers, byte [k][r][i] = (w[r][4k + i] + 8) | (w[r][16 + 4k + i] + 8) << 4 (a q4_0
//       block's nibbles, regrouped): its low nibbles give lanes l = k, its high ones l = k + 4.
// Lane sum l of row r is then one 32-bit lane of an integer dot of such a register with the four
// activations x[4l..4l+3] broadcast, and acc[l] for 16 rows is one float register: per block
// and row the same integer lane sums and the same fma as before, 16 rows per instruction. The
// unsigned offsets (+128, +8) come off exactly: the dot starts from -128 or -8 times the sum of
// the four activations (quantize_rows computes those sums once per product).
constexpr int64_t kPanel = 16;
constexpr int64_t kScaleBytes = 2 * kPanel;

inline int64_t value_bytes(int kind) { return kind == kQ8 ? 8 * 64 : 4 * 64; }
inline int64_t panel_block_bytes(int kind) { return kScaleBytes + value_bytes(kind); }

struct Act {  // quantize_rows's buffer, for the B rows it holds
    const float* d;  // (B, nb) scales
    const int8_t* q;  // (B, in) values
    const int32_t* s8;  // (B, nb, 8): -8 x the sum of x[4l..4l+3], the q4 products' start
    const int32_t* s128;  // (B, nb, 8): -128 x the same sums, the q8 products' start
    int64_t nb, in;
    Act row(int64_t b) const { return Act{d + b * nb, q + b * in, s8 + b * nb * 8, s128 + b * nb * 8, nb, in}; }
};

int64_t act_head(int64_t B, int64_t nb) { return (B * nb * (int64_t)sizeof(float) + 63) / 64 * 64; }

Act act_of(const void* xq, int64_t B, int64_t in) {
    const int64_t nb = in / kBlock, head = act_head(B, nb);
    const int8_t* q = (const int8_t*)xq + head;
    const int32_t* s8 = (const int32_t*)(q + (B * in + 63) / 64 * 64);
    return Act{(const float*)xq, q, s8, s8 + B * nb * 8, nb, in};
}

// The 32 signed weights and the scale of row r (0..15), block a, of a panel block.
inline float panel_weights(int kind, const uint8_t* pb, int64_t r, int8_t* w) {
    const uint8_t* v = pb + kScaleBytes;
    for (int i = 0; i < 4; i++)
        if (kind == kQ8) {
            for (int l = 0; l < 8; l++) w[4 * l + i] = (int8_t)(v[l * 64 + r * 4 + i] - 128);
        } else {
            for (int k = 0; k < 4; k++) {
                const uint8_t b = v[k * 64 + r * 4 + i];
                w[4 * k + i] = (int8_t)((b & 15) - 8), w[16 + 4 * k + i] = (int8_t)((b >> 4) - 8);
            }
        }
    return half_to_float(half_bits(pb + 2 * r));
}

// out[b * 16 + r] = row r of the panel P . x row b, for b < B: the reference every kernel equals.
void panel_scalar(int kind, const uint8_t* P, Act x, int64_t B, float* out) {
    const int64_t pbb = panel_block_bytes(kind);
    int8_t w[kBlock];
    for (int64_t r = 0; r < kPanel; r++)
        for (int64_t b = 0; b < B; b++) {
            const Act xb = x.row(b);
            float acc[8] = {};
            for (int64_t a = 0; a < x.nb; a++) {
                const float dw = panel_weights(kind, P + a * pbb, r, w);
                const int8_t* xa = xb.q + a * kBlock;
                const float sc = dw * xb.d[a];
                for (int l = 0; l < 8; l++) {
                    int32_t p = 0;
                    for (int i = 4 * l; i < 4 * l + 4; i++) p += (int32_t)w[i] * (int32_t)xa[i];
                    acc[l] = std::fma(sc, (float)p, acc[l]);
                }
            }
            out[b * kPanel + r] = reduce8(acc);
        }
}

#if defined(SLMQ_X86)
#define SLMQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SLMQ_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define SLMQ_VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

inline int32_t load4(const void* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// AVX-512 VNNI: a whole panel (16 rows) per register, BB activation rows per pass over its blocks
// (each block's weights unpacked once for them). 8 BB accumulators + the weights: BB <= 3.
template <int KIND, int BB>
SLMQ_VNNI512 void panel_vnni512(const uint8_t* P, Act x, float* out) {
    constexpr int64_t pbb = KIND == kQ8 ? kScaleBytes + 512 : kScaleBytes + 256;
    const int32_t* start = KIND == kQ8 ? x.s128 : x.s8;
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc[BB][8];
    for (int b = 0; b < BB; b++)
        for (int l = 0; l < 8; l++) acc[b][l] = _mm512_setzero_ps();
    for (int64_t a = 0; a < x.nb; a++) {
        const uint8_t* pb = P + a * pbb;
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)pb));
        __m512 sc[BB];
        for (int b = 0; b < BB; b++) sc[b] = _mm512_mul_ps(sw, _mm512_set1_ps(x.d[b * x.nb + a]));
        const uint8_t* v = pb + kScaleBytes;
        for (int l = 0; l < 8; l++) {
            __m512i w;
            if (KIND == kQ8) {
                w = _mm512_loadu_si512(v + 64 * l);
            } else {
                const __m512i raw = _mm512_loadu_si512(v + 64 * (l & 3));
                w = _mm512_and_si512(l < 4 ? raw : _mm512_srli_epi16(raw, 4), low4);
            }
            for (int b = 0; b < BB; b++) {
                const int64_t ba = b * x.nb + a;
                const __m512i p = _mm512_dpbusd_epi32(_mm512_set1_epi32(start[ba * 8 + l]), w,
                                                      _mm512_set1_epi32(load4(x.q + b * x.in + a * kBlock + 4 * l)));
                acc[b][l] = _mm512_fmadd_ps(sc[b], _mm512_cvtepi32_ps(p), acc[b][l]);
            }
        }
    }
    for (int b = 0; b < BB; b++) {  // reduce8's order, 16 rows at a time
        const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][4]), _mm512_add_ps(acc[b][2], acc[b][6])),
                                       _mm512_add_ps(_mm512_add_ps(acc[b][1], acc[b][5]), _mm512_add_ps(acc[b][3], acc[b][7])));
        _mm512_storeu_ps(out + b * kPanel, r);
    }
}

// 256-bit kernels: half a panel (8 rows) per register, one activation row at a time (AVX2 has 16
// registers: 8 accumulators, the weights, the scales). The integer dot per IDOT.
#define SLMQ_PANEL256(NAME, ATTR, IDOT4, IDOT8)                                                                \
    template <int KIND>                                                                                        \
    ATTR void NAME(const uint8_t* P, Act x, float* out) {                                                      \
        constexpr int64_t pbb = KIND == kQ8 ? kScaleBytes + 512 : kScaleBytes + 256;                           \
        const int32_t* start = KIND == kQ8 ? x.s128 : x.s8;                                                    \
        const __m256i low4 = _mm256_set1_epi8(15);                                                             \
        for (int h = 0; h < 2; h++) {                                                                          \
            __m256 acc[8];                                                                                     \
            for (int l = 0; l < 8; l++) acc[l] = _mm256_setzero_ps();                                          \
            for (int64_t a = 0; a < x.nb; a++) {                                                               \
                const uint8_t* pb = P + a * pbb;                                                               \
                const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(pb + 16 * h))), \
                                                _mm256_set1_ps(x.d[a]));                                       \
                const uint8_t* v = pb + kScaleBytes + 32 * h;                                                  \
                for (int l = 0; l < 8; l++) {                                                                  \
                    const __m256i xv = _mm256_set1_epi32(load4(x.q + a * kBlock + 4 * l));                     \
                    __m256i p;                                                                                 \
                    if (KIND == kQ8) {                                                                         \
                        p = IDOT8(_mm256_loadu_si256((const __m256i*)(v + 64 * l)), xv,                       \
                                  _mm256_set1_epi32(start[a * 8 + l]));                                        \
                    } else {                                                                                   \
                        const __m256i raw = _mm256_loadu_si256((const __m256i*)(v + 64 * (l & 3)));           \
                        p = IDOT4(_mm256_and_si256(l < 4 ? raw : _mm256_srli_epi16(raw, 4), low4), xv,         \
                                  _mm256_set1_epi32(start[a * 8 + l]));                                        \
                    }                                                                                          \
                    acc[l] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p), acc[l]);                               \
                }                                                                                              \
            }                                                                                                  \
            const __m256 r = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6])), \
                                           _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]))); \
            _mm256_storeu_ps(out + 8 * h, r);                                                                  \
        }                                                                                                      \
    }

// AVX2: u8 x s8 pairs (vpmaddubsw), then pairs of pairs (vpmaddwd). q4: nibble (<= 15) x x fits
// 16 bits. q8: (w + 128) x x could overflow a 16-bit pair sum, so it takes the signed weight and
// the sign trick (|w| unsigned times x with w's sign, exact for w = -128) and starts from 0.
SLMQ_AVX2 inline __m256i idot4_avx2(__m256i w, __m256i x, __m256i start) {
    return _mm256_add_epi32(start, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
SLMQ_AVX2 inline __m256i idot8_avx2(__m256i wu, __m256i x, __m256i) {
    const __m256i w = _mm256_xor_si256(wu, _mm256_set1_epi8((char)0x80));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
SLMQ_PANEL256(panel_avx2, SLMQ_AVX2, idot4_avx2, idot8_avx2)
#if defined(SLMQ_AVXVNNI_BUILT)
SLMQ_AVXVNNI inline __m256i idot_avxvnni(__m256i w, __m256i x, __m256i start) {
    return _mm256_dpbusd_avx_epi32(start, w, x);
}
SLMQ_PANEL256(panel_avxvnni, SLMQ_AVXVNNI, idot_avxvnni, idot_avxvnni)
#endif
#undef SLMQ_PANEL256
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

// One panel's 16 rows times the B rows of x: out[b * 16 + r], with the kernel's best batching.
void run_panel(int kernel, int kind, const uint8_t* P, Act x, int64_t B, float* out) {
#if defined(SLMQ_X86)
    if (kernel == 4) {
        for (int64_t b = 0; b < B;) {
            const int64_t n = std::min<int64_t>(B - b, 3);
            const Act xb = x.row(b);
            float* o = out + b * kPanel;
            if (kind == kQ8) {
                if (n == 3) panel_vnni512<kQ8, 3>(P, xb, o);
                else if (n == 2) panel_vnni512<kQ8, 2>(P, xb, o);
                else panel_vnni512<kQ8, 1>(P, xb, o);
            } else {
                if (n == 3) panel_vnni512<kQ4, 3>(P, xb, o);
                else if (n == 2) panel_vnni512<kQ4, 2>(P, xb, o);
                else panel_vnni512<kQ4, 1>(P, xb, o);
            }
            b += n;
        }
        return;
    }
    if (kernel == 2 || kernel == 3) {
        for (int64_t b = 0; b < B; b++) {
#if defined(SLMQ_AVXVNNI_BUILT)
            if (kernel == 3) {
                if (kind == kQ8) panel_avxvnni<kQ8>(P, x.row(b), out + b * kPanel);
                else panel_avxvnni<kQ4>(P, x.row(b), out + b * kPanel);
                continue;
            }
#endif
            if (kind == kQ8) panel_avx2<kQ8>(P, x.row(b), out + b * kPanel);
            else panel_avx2<kQ4>(P, x.row(b), out + b * kPanel);
        }
        return;
    }
#endif
    (void)kernel;
    panel_scalar(kind, P, x, B, out);
}

// dots for rows j0..j1 of the panels W: each panel covering them runs on all B rows (its weights
// read from memory once per step), into a small buffer whose rows in range are copied out.
void run_kernel(int kernel, int64_t fmt, const void* W, int64_t in, const void* xq, int64_t B, int64_t j0, int64_t j1,
                float* dots, int64_t ldd) {
    const int kind = kind_of(fmt);
    const Act x = act_of(xq, B, in);
    const int64_t panel_bytes = x.nb * panel_block_bytes(kind);
    thread_local std::vector<float> buf;
    if ((int64_t)buf.size() < B * kPanel) buf.resize(B * kPanel);
    for (int64_t p = j0 / kPanel; p * kPanel < j1; p++) {
        run_panel(kernel, kind, (const uint8_t*)W + p * panel_bytes, x, B, buf.data());
        const int64_t lo = std::max(j0, p * kPanel), hi = std::min(j1, (p + 1) * kPanel);
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = lo; j < hi; j++) dots[b * ldd + (j - j0)] = buf[b * kPanel + (j - p * kPanel)];
    }
}

int64_t xq_bytes(int64_t B, int64_t in) {
    const int64_t nb = in / kBlock;
    return act_head(B, nb) + (B * in + 63) / 64 * 64 + 2 * B * nb * 8 * (int64_t)sizeof(int32_t);
}

namespace {

// One activation block: its scale, its 32 int8 values and the start values of its lane sums.
void quantize_block(const float* xa, float* d, int8_t* o, int32_t* s8, int32_t* s128) {
    float m = 0.f;
    for (int i = 0; i < kBlock; i++) m = std::max(m, std::fabs(xa[i]));
    const float scale = m / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    *d = scale;
    for (int i = 0; i < kBlock; i++) o[i] = (int8_t)std::nearbyint(xa[i] * inv);
    for (int l = 0; l < 8; l++) {
        const int32_t sum = o[4 * l] + o[4 * l + 1] + o[4 * l + 2] + o[4 * l + 3];
        s8[l] = -8 * sum, s128[l] = -128 * sum;
    }
}

#if defined(SLMQ_X86)
// The same, 8 floats at a time: the same maximum (std::max's: a NaN value is passed over), the
// same scale and reciprocal, the same products rounded to nearest even (vcvtps2dq in the default
// rounding mode, as nearbyint), so the same bytes (tests: slm_qmatvec's scalar kernel uses the
// scalar function).
SLMQ_AVX2 void quantize_block_avx2(const float* xa, float* d, int8_t* o, int32_t* s8, int32_t* s128) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xa + 8 * i);
        m = _mm256_max_ps(_mm256_and_ps(v[i], abs_mask), m);  // the second operand where either is NaN
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float scale = _mm_cvtss_f32(h) / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    *d = scale;
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)o, ordered);
    const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), ordered), _mm256_set1_epi16(1));
    _mm256_storeu_si256((__m256i*)s8, _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 3)));
    _mm256_storeu_si256((__m256i*)s128, _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sums, 7)));
}
#endif

// quantize_rows, with the vector code where the CPU has AVX2 and vector is set.
void quantize_rows_with(bool vector, const float* X, int64_t in, int64_t ldx, int64_t B, void* xq) {
    const int64_t nb = in / kBlock;
    const Act x = act_of(xq, B, in);
#if defined(SLMQ_X86)
    static const bool avx2 = has("avx2");
    vector = vector && avx2;
#else
    vector = false;
#endif
    for (int64_t b = 0; b < B; b++)
        for (int64_t a = 0; a < nb; a++) {
            const int64_t i = b * nb + a;
            float* d = (float*)x.d + i;
            int8_t* o = (int8_t*)x.q + b * in + a * kBlock;
            int32_t *s8 = (int32_t*)x.s8 + i * 8, *s128 = (int32_t*)x.s128 + i * 8;
#if defined(SLMQ_X86)
            if (vector) {
                quantize_block_avx2(X + b * ldx + a * kBlock, d, o, s8, s128);
                continue;
            }
#endif
            quantize_block(X + b * ldx + a * kBlock, d, o, s8, s128);
        }
}

}  // namespace

void quantize_rows(const float* X, int64_t in, int64_t ldx, int64_t B, void* xq) {
    quantize_rows_with(true, X, in, ldx, B, xq);
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

int64_t packed_bytes(int64_t fmt, int64_t rows, int64_t in) {
    return (rows + kPanel - 1) / kPanel * (in / kBlock) * panel_block_bytes(kind_of(fmt));
}

void pack(int64_t fmt, const void* src, int64_t rows, int64_t in, void* dst) {
    const int kind = kind_of(fmt);
    const int64_t group = group_of(fmt), bb = block_bytes(kind, group), sub = group / kBlock, nb = in / kBlock;
    const int64_t pbb = panel_block_bytes(kind), panels = (rows + kPanel - 1) / kPanel;
    uint8_t* out = (uint8_t*)dst;
    std::memset(out, 0, packed_bytes(fmt, rows, in));  // rows past the end: scale 0
    int8_t w[kBlock];
    for (int64_t j = 0; j < rows; j++) {
        const int64_t r = j % kPanel;
        const uint8_t* row = (const uint8_t*)src + j * (in / group) * bb;
        for (int64_t a = 0; a < nb; a++) {
            const uint8_t* blk = row + (a / sub) * bb;
            uint8_t* pb = out + ((j / kPanel) * nb + a) * pbb;
            pb[2 * r] = blk[0], pb[2 * r + 1] = blk[1];
            weights_of(kind, group, blk + 2, a % sub, w);
            uint8_t* v = pb + kScaleBytes;
            for (int i = 0; i < 4; i++)
                if (kind == kQ8) {
                    for (int l = 0; l < 8; l++) v[l * 64 + r * 4 + i] = (uint8_t)(w[4 * l + i] + 128);
                } else {
                    for (int k = 0; k < 4; k++)
                        v[k * 64 + r * 4 + i] = (uint8_t)((w[4 * k + i] + 8) | (w[16 + 4 * k + i] + 8) << 4);
                }
        }
    }
    (void)panels;
}

}  // namespace slmq

extern "C" {

// Bytes of the panels slm_qpack makes of a (rows x in) int8/int4 matrix of format fmt; -1 for a
// format the products cannot read.
int64_t slm_qpacked_bytes(int64_t fmt, int64_t rows, int64_t in) {
    const int64_t group = fmt >> 8;
    if (!slmq::quantized(fmt) || group <= 0 || group % 32 || in % group) return -1;
    return slmq::packed_bytes(fmt, rows, in);
}

// Repacks slm quantize's blocks (rows x in, format fmt) into the panels the products read (see
// qdecode.cpp). Returns 0, or 3 for a format the products cannot read.
int slm_qpack(int64_t fmt, const void* src, int64_t rows, int64_t in, void* dst) {
    if (slm_qpacked_bytes(fmt, rows, in) < 0) return 3;
    slmq::pack(fmt, src, rows, in, dst);
    return 0;
}

// For tests and benchmarks: out (B, rows) = W . X^T for W as slm quantize stores it (format fmt,
// rows x in; packed into panels here) and float X (B, in), X quantized as the decode step does,
// with kernel 0 (best), 1 scalar, 2 AVX2, 3 AVX-VNNI, 4 AVX-512 VNNI. Returns 0, or 2 when this
// CPU lacks the kernel, 3 for a bad format.
int slm_qmatvec(int64_t fmt, int kernel, const void* W, int64_t rows, int64_t in, const float* X, int64_t B,
                float* out) {
    const int64_t size = slm_qpacked_bytes(fmt, rows, in);
    if (size < 0) return 3;
    if (kernel == 0) kernel = slmq::kernel_for_isa(3);
    if (!slmq::kernel_available(kernel)) return 2;
    std::vector<uint8_t> panels(size);
    slmq::pack(fmt, W, rows, in, panels.data());
    std::vector<char> xq(slmq::xq_bytes(B, in));
    slmq::quantize_rows_with(kernel != 1, X, in, in, B, xq.data());  // the scalar kernel: all scalar
    slmq::run_kernel(kernel, fmt, panels.data(), in, xq.data(), B, 0, rows, out, rows);
    return 0;
}

// The kernel the decode step uses for decode.cpp's isa (1 scalar, 2 AVX2, 3 AVX-512): 1-4 as above.
int slm_qmatvec_kernel(int isa) { return slmq::kernel_for_isa(isa); }

}  // extern "C"
