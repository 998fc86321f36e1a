// One decode step of a float32 GPT in one call: every layer (norms, rotary or learned positions,
// attention over the KV cache with grouped-query heads, GELU or SwiGLU, biases) and the head, for
// a batch of rows that each have their own first real slot (left padding). See slmkit/decode/native.py.
//
// Speed at batch 1 is reading the weights once per token: the matrix-vector products are written
// with AVX-512 and AVX2 intrinsics (functions with target attributes, picked at run time from the
// CPU's features, or forced by the caller) and a scalar loop elsewhere (ARM builds and runs that).
// Threads: a small pool of our own. Work is cut into tasks (32 output rows of a product, one
// (row, kv head) of attention) claimed from one atomic counter, so the caller never waits for a
// worker that the OS has not scheduled: it takes the remaining tasks itself. An idle worker spins
// for a short while (SLMKIT_DECODE_SPIN_US, default 100 us) and then sleeps on a condition variable:
// no thread burns a core between tokens. Every output value is computed by one task in a fixed
// order, so the thread count never changes a result.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define SLM_X86 1
#include <immintrin.h>
#endif

#include "qdecode.h"
#include "vec.h"

namespace {

inline void cpu_relax() {
#if defined(SLM_X86)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// --------------------------------------------------------------------------- the thread pool

typedef void (*TaskFn)(void* ctx, int64_t task);

class Pool {
  public:
    // Runs fn(ctx, t) for t in [0, n) on the caller and up to threads - 1 workers.
    void run(int threads, int64_t n, TaskFn fn, void* ctx) {
        if (threads <= 1 || n <= 1) {
            for (int64_t t = 0; t < n; t++) fn(ctx, t);
            return;
        }
        while ((int)workers_.size() < threads - 1) {
            const int id = (int)workers_.size();
            workers_.emplace_back(1);
            std::thread([this, id] { loop(id); }).detach();  // lives as long as the process
        }
        active_.store(threads - 1, std::memory_order_relaxed);
        fn_ = fn;
        ctx_ = ctx;
        done_.store(0, std::memory_order_relaxed);
        gen_ = (gen_ + 1) & kGenMask;
        ticket_.store((gen_ << 40) | ((uint64_t)n << 20), std::memory_order_release);
        wake_.store((uint32_t)gen_);  // seq_cst, before reading sleepers_ (see loop)
        if (sleepers_.load() > 0) {
            { std::lock_guard<std::mutex> lock(mutex_); }
            cv_.notify_all();
        }
        work(gen_);
        while (done_.load(std::memory_order_acquire) < n) cpu_relax();  // only tasks already claimed
    }

  private:
    static constexpr uint64_t kGenMask = (1u << 24) - 1;
    static constexpr uint64_t kField = (1u << 20) - 1;

    // Claims tasks of generation gen until none are left; false when it did none.
    void work(uint64_t gen) {
        uint64_t t = ticket_.load(std::memory_order_acquire);
        for (;;) {
            const uint64_t n = (t >> 20) & kField, k = t & kField;
            if ((t >> 40) != gen || k >= n) return;
            if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
            fn_(ctx_, (int64_t)k);  // the job cannot end (nor fn_ change) before this task is done
            done_.fetch_add(1, std::memory_order_release);
            t = ticket_.load(std::memory_order_acquire);
        }
    }

    void loop(int id) {
        uint32_t seen = wake_.load();
        const char* env = std::getenv("SLMKIT_DECODE_SPIN_US");
        const auto spin = std::chrono::microseconds(env ? std::atol(env) : 100);
        for (;;) {
            auto t0 = std::chrono::steady_clock::now();
            uint32_t w;
            for (int i = 1; (w = wake_.load(std::memory_order_acquire)) == seen; i++) {
                cpu_relax();
                if (i % 256 == 0 && std::chrono::steady_clock::now() - t0 > spin) {
                    std::unique_lock<std::mutex> lock(mutex_);
                    sleepers_.fetch_add(1);
                    cv_.wait(lock, [&] { return wake_.load() != seen; });
                    sleepers_.fetch_sub(1);
                    t0 = std::chrono::steady_clock::now();
                }
            }
            seen = w;
            if (id < active_.load(std::memory_order_relaxed)) work(w);
        }
    }

    std::vector<char> workers_;
    std::atomic<uint64_t> ticket_{0};  // generation (24 bits) | task count (20) | next task (20)
    std::atomic<uint32_t> wake_{0};
    std::atomic<int64_t> done_{0};
    std::atomic<int> sleepers_{0}, active_{0};
    uint64_t gen_ = 0;
    TaskFn fn_ = nullptr;
    void* ctx_ = nullptr;
    std::mutex mutex_;
    std::condition_variable cv_;
};

// --------------------------------------------------------------------------- matrix-vector products

// dots[b * ldd + r] = W[j0 + r] . X[b] for rows j0 <= j < j1 and B rows of X. One accumulator per
// output, in the same order whatever the tiling, so results do not depend on how rows are split.
typedef void (*MatvecFn)(const float* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                         int64_t j0, int64_t j1, float* dots, int64_t ldd);

void matvec_scalar(const float* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                   int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    for (int64_t j = j0; j < j1; j++)
        for (int64_t b = 0; b < B; b++) {
            const float* w = W + j * in;
            const float* x = X + b * ldx;
            float s = 0.f;
            for (int64_t k = 0; k < in; k++) s += w[k] * x[k];
            dots[b * ldd + (j - j0)] = s;
        }
}

#if defined(SLM_X86)
#define SLM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define SLM_AVX2 __attribute__((target("avx2,fma")))

template <int R, int BB>
SLM_AVX512 inline void tile512(const float* W, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd) {
    __m512 acc[R][BB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) acc[r][b] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= in; k += 16) {
        __m512 x[BB];
        for (int b = 0; b < BB; b++) x[b] = _mm512_loadu_ps(X + b * ldx + k);
        for (int r = 0; r < R; r++) {
            const __m512 w = _mm512_loadu_ps(W + r * in + k);
            for (int b = 0; b < BB; b++) acc[r][b] = _mm512_fmadd_ps(w, x[b], acc[r][b]);
        }
    }
    if (k < in) {
        const __mmask16 m = (__mmask16)((1u << (in - k)) - 1);
        __m512 x[BB];
        for (int b = 0; b < BB; b++) x[b] = _mm512_maskz_loadu_ps(m, X + b * ldx + k);
        for (int r = 0; r < R; r++) {
            const __m512 w = _mm512_maskz_loadu_ps(m, W + r * in + k);
            for (int b = 0; b < BB; b++) acc[r][b] = _mm512_fmadd_ps(w, x[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) dots[b * ldd + r] = _mm512_reduce_add_ps(acc[r][b]);
}

template <int BB>
SLM_AVX512 void rows512(const float* W, int64_t in, const float* X, int64_t ldx, int64_t j0, int64_t j1,
                        float* dots, int64_t ldd) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile512<4, BB>(W + j * in, in, X, ldx, dots + (j - j0), ldd);
    for (; j < j1; j++) tile512<1, BB>(W + j * in, in, X, ldx, dots + (j - j0), ldd);
}

SLM_AVX512 void matvec_avx512(const float* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                              int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) rows512<4>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd);
    switch (B - b) {
        case 3: rows512<3>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd); break;
        case 2: rows512<2>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd); break;
        case 1: rows512<1>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd); break;
        default: break;
    }
}

SLM_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int R, int BB>
SLM_AVX2 inline void tile256(const float* W, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd) {
    __m256 acc[R][BB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= in; k += 8) {
        __m256 x[BB];
        for (int b = 0; b < BB; b++) x[b] = _mm256_loadu_ps(X + b * ldx + k);
        for (int r = 0; r < R; r++) {
            const __m256 w = _mm256_loadu_ps(W + r * in + k);
            for (int b = 0; b < BB; b++) acc[r][b] = _mm256_fmadd_ps(w, x[b], acc[r][b]);
        }
    }
    if (k < in) {
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(in - k)), lanes);
        __m256 x[BB];
        for (int b = 0; b < BB; b++) x[b] = _mm256_maskload_ps(X + b * ldx + k, m);
        for (int r = 0; r < R; r++) {
            const __m256 w = _mm256_maskload_ps(W + r * in + k, m);
            for (int b = 0; b < BB; b++) acc[r][b] = _mm256_fmadd_ps(w, x[b], acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < BB; b++) dots[b * ldd + r] = hsum256(acc[r][b]);
}

template <int BB>
SLM_AVX2 void rows256(const float* W, int64_t in, const float* X, int64_t ldx, int64_t j0, int64_t j1,
                      float* dots, int64_t ldd) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile256<4, BB>(W + j * in, in, X, ldx, dots + (j - j0), ldd);
    for (; j < j1; j++) tile256<1, BB>(W + j * in, in, X, ldx, dots + (j - j0), ldd);
}

SLM_AVX2 void matvec_avx2(const float* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                          int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    int64_t b = 0;  // 4 rows x 2 batch rows: 8 accumulators of the 16 ymm registers
    for (; b + 2 <= B; b += 2) rows256<2>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd);
    if (b < B) rows256<1>(W, in, X + b * ldx, ldx, j0, j1, dots + b * ldd, ldd);
}
#endif

enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

int best_isa() {
#if defined(SLM_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl"))
        return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
    return kScalar;
}

MatvecFn matvec_for(int isa) {
#if defined(SLM_X86)
    if (isa == kAvx512) return matvec_avx512;
    if (isa == kAvx2) return matvec_avx2;
#endif
    return matvec_scalar;
}

// --------------------------------------------------------------------------- the small operations

inline float dot(const float* a, const float* b, int64_t n) {
    vf acc = splat(0.f);
    int64_t k = 0;
    for (; k + W <= n; k += W) acc += load(a + k) * load(b + k);
    float s = hsum(acc);
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

inline float sum(const float* a, int64_t n) {
    vf acc = splat(0.f);
    int64_t k = 0;
    for (; k + W <= n; k += W) acc += load(a + k);
    float s = hsum(acc);
    for (; k < n; k++) s += a[k];
    return s;
}

// out = norm(x) * w (+ b): RMSNorm, or LayerNorm when layernorm.
void norm(const float* x, const float* w, const float* b, int64_t C, float eps, bool layernorm, float* out) {
    if (layernorm) {
        const float mean = sum(x, C) / C;
        for (int64_t i = 0; i < C; i++) out[i] = x[i] - mean;
        const float scale = 1.f / std::sqrt(dot(out, out, C) / C + eps);
        for (int64_t i = 0; i < C; i++) out[i] = out[i] * scale * w[i] + (b ? b[i] : 0.f);
    } else {
        const float scale = 1.f / std::sqrt(dot(x, x, C) / C + eps);
        for (int64_t i = 0; i < C; i++) out[i] = x[i] * scale * w[i];
    }
}

// silu(gate) * up (swiglu) or gelu_tanh(up), 16 lanes at a time with vec.h's exp (x <= 0).
void activate(float* gate, const float* up, int64_t n, bool swiglu) {
    for (int64_t i = 0; i < n; i += W) {
        float g[W] = {}, u[W] = {};
        const int64_t m = std::min<int64_t>(W, n - i);
        for (int64_t l = 0; l < m; l++) g[l] = gate[i + l], u[l] = swiglu ? up[i + l] : 0.f;
        vf a = load(g), r;
        const vf zero = splat(0.f), one = splat(1.f);
        if (swiglu) {  // sigmoid(a) from e = exp(-|a|): 1 / (1 + e) for a >= 0, e / (1 + e) below
            const vf e = vexp(select(a >= zero, -a, a));
            r = a * select(a >= zero, one, e) / (one + e) * load(u);
        } else {  // tanh(y) = sign(y) (1 - e) / (1 + e) with e = exp(-2|y|)
            const vf y = splat(0.7978845608028654f) * (a + splat(0.044715f) * a * a * a);
            const vf e = vexp(select(y >= zero, splat(-2.f) * y, splat(2.f) * y));
            const vf t = (one - e) / (one + e);
            r = splat(0.5f) * a * (one + select(y >= zero, t, -t));
        }
        for (int64_t l = 0; l < m; l++) gate[i + l] = r[l];
    }
}

// --------------------------------------------------------------------------- the step

// cfg: vocab, n_layer, n_head, n_kv_head, head_dim, n_embd, hidden, layernorm, rope, swiglu
enum { kVocab, kLayers, kHeads, kKV, kHeadDim, kEmbd, kHidden, kLayerNorm, kRope, kSwiGLU, kCfg };
// w: tok_emb, pos_emb, rope_cos, rope_sin, norm_w, norm_b, head_w, head_b, then per layer:
enum { kTokEmb, kPosEmb, kCos, kSin, kNormW, kNormB, kHeadW, kHeadB, kGlobal };
enum { kN1w, kN1b, kQkvW, kQkvB, kProjW, kProjB, kN2w, kN2b, kUpW, kUpB, kDownW, kDownB, kPerLayer };

constexpr int64_t kRows = 32;  // output rows per task of a product

struct Step {
    const int64_t* cfg;
    const float* const* w;
    float eps;
    const int64_t* start;
    int64_t B, S, max_len;
    float *kc, *vc;
    MatvecFn matvec;
    float *x, *h, *qkv, *att, *act, *logits;
    int64_t layer;
    // the product of the current phase
    const float *W, *bias, *X;
    int64_t in, out, ldx, ldy;
    float* Y;
    bool add;
    // int8/int4 weights (qdecode.h): each tensor's format (null: all float32), the isa, the
    // current product's format and its activations quantized once (slmq::quantize_rows)
    const int64_t* fmt;
    int isa;
    int64_t wfmt;
    void* xq;
};

// dots = rows j0..j1 of W (format fmt) times the B rows of X, or of their quantized copy s.xq.
inline void matvec_any(const Step& s, const void* W, int64_t fmt, int64_t in, const float* X, int64_t ldx,
                       int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    if (fmt) slmq::matvec(fmt, s.isa, W, in, s.xq, s.B, j0, j1, dots, ldd);
    else s.matvec((const float*)W, in, X, ldx, s.B, j0, j1, dots, ldd);
}

inline int64_t fmt_of(const Step& s, int64_t i) { return s.fmt ? s.fmt[i] : 0; }

thread_local std::vector<float> tls;  // per-thread scratch: dots of a task, attention scores

float* scratch(int64_t n) {
    if ((int64_t)tls.size() < n) tls.resize(n);
    return tls.data();
}

// Y[b, j] (+)= W[j] . X[b] + bias[j] for the task's rows.
void product_task(void* p, int64_t task) {
    Step& s = *(Step*)p;
    const int64_t j0 = task * kRows, j1 = std::min(s.out, j0 + kRows), R = j1 - j0;
    float* dots = scratch(s.B * R);
    matvec_any(s, s.W, s.wfmt, s.in, s.X, s.ldx, j0, j1, dots, R);
    for (int64_t b = 0; b < s.B; b++) {
        float* y = s.Y + b * s.ldy + j0;
        const float* d = dots + b * R;
        for (int64_t r = 0; r < R; r++) {
            const float v = d[r] + (s.bias ? s.bias[j0 + r] : 0.f);
            y[r] = s.add ? y[r] + v : v;
        }
    }
}

// act[b, j] = silu(gate_j . h[b]) * (up_j . h[b]), or gelu(up_j . h[b]), for the task's rows j.
void up_task(void* p, int64_t task) {
    Step& s = *(Step*)p;
    const int64_t hidden = s.cfg[kHidden], C = s.cfg[kEmbd];
    const bool swiglu = s.cfg[kSwiGLU];
    const int64_t j0 = task * kRows, j1 = std::min(hidden, j0 + kRows), R = j1 - j0;
    const float* const* lw = s.w + kGlobal + s.layer * kPerLayer;
    const float *Wu = lw[kUpW], *bu = lw[kUpB];
    const int64_t fu = fmt_of(s, kGlobal + s.layer * kPerLayer + kUpW);
    float* gate = scratch(2 * s.B * R);
    float* up = gate + s.B * R;
    matvec_any(s, Wu, fu, C, s.h, C, j0, j1, gate, R);
    if (swiglu) matvec_any(s, Wu, fu, C, s.h, C, hidden + j0, hidden + j1, up, R);
    for (int64_t b = 0; b < s.B; b++) {
        for (int64_t r = 0; r < R; r++) {
            if (bu) gate[b * R + r] += bu[j0 + r];
            if (swiglu && bu) up[b * R + r] += bu[hidden + j0 + r];
        }
        activate(gate + b * R, up + b * R, R, swiglu);
        std::copy(gate + b * R, gate + (b + 1) * R, s.act + b * hidden + j0);
    }
}

void rotate(float* x, const float* c, const float* sn, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * sn[i];
        x[i + half] = x2 * c[i] + x1 * sn[i];
    }
}

// One (row, kv head): rotate its keys and queries, store the key and value in slot S, attend.
void attention_task(void* p, int64_t task) {
    Step& s = *(Step*)p;
    const int64_t H = s.cfg[kHeads], KV = s.cfg[kKV], D = s.cfg[kHeadDim], rep = H / KV;
    const int64_t b = task / KV, g = task % KV, S = s.S;
    const int64_t lo = std::min(s.start[b], S), pos = std::max<int64_t>(S - s.start[b], 0);
    float* row = s.qkv + b * (H + 2 * KV) * D;
    float* k = row + (H + g) * D;
    const float* v = row + (H + KV + g) * D;
    if (s.cfg[kRope]) {
        const int64_t half = D / 2;
        const float *c = s.w[kCos] + pos * half, *sn = s.w[kSin] + pos * half;
        rotate(k, c, sn, half);
        for (int64_t q = g * rep; q < (g + 1) * rep; q++) rotate(row + q * D, c, sn, half);
    }
    const int64_t base = (((s.layer * s.B + b) * KV + g) * s.max_len) * D;
    float *K = s.kc + base, *V = s.vc + base;
    std::copy(k, k + D, K + S * D);
    std::copy(v, v + D, V + S * D);
    const int64_t n = S + 1 - lo;
    float* scores = scratch((n + W) / W * W);
    const float scale = 1.f / std::sqrt((float)D);
    for (int64_t q = g * rep; q < (g + 1) * rep; q++) {
        const float* qv = row + q * D;
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            scores[j] = dot(qv, K + (lo + j) * D, D) * scale;
            m = std::max(m, scores[j]);
        }
        for (int64_t j = n; j < (n + W - 1) / W * W; j++) scores[j] = -INFINITY;
        vf total = splat(0.f);
        for (int64_t j = 0; j < n; j += W) {
            const vf e = vexp(load(scores + j) - splat(m));
            store(scores + j, e);
            total += e;
        }
        const float inv = 1.f / hsum(total);
        float* out = s.att + b * H * D + q * D;
        for (int64_t d = 0; d < D; d++) out[d] = 0.f;
        for (int64_t j = 0; j < n; j++) {
            const float pj = scores[j] * inv;
            const float* vj = V + (lo + j) * D;
            for (int64_t d = 0; d < D; d++) out[d] += pj * vj[d];
        }
    }
}

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: its detached workers outlive static destructors
    return *p;
}

std::mutex step_mutex;  // one step at a time (ctypes releases the GIL)
std::vector<float> workspace;

std::vector<char> xq_buffer;

// Quantizes X for the products of weight i when that weight is int8/int4 (once per product).
void prepare(Step& s, int64_t i, const float* X, int64_t in) {
    s.wfmt = fmt_of(s, i);
    if (!s.wfmt) return;
    xq_buffer.resize(slmq::xq_bytes(s.B, in));
    s.xq = xq_buffer.data();
    slmq::quantize_rows(X, in, in, s.B, s.xq);
}

void product(Step& s, int threads, int64_t i, const float* bias, const float* X, int64_t in, int64_t out,
             float* Y, int64_t ldy, bool add) {
    prepare(s, i, X, in);
    s.W = s.w[i], s.bias = bias, s.X = X, s.in = in, s.out = out, s.ldx = in, s.Y = Y, s.ldy = ldy, s.add = add;
    pool().run(threads, (out + kRows - 1) / kRows, product_task, &s);
}

}  // namespace

extern "C" {

// The best instruction set for the products on this CPU: 1 scalar, 2 AVX2, 3 AVX-512.
int slm_decode_isa() { return best_isa(); }

// One token per row: ids (B,), start (B,) the first real slot of each row, S the slots filled so
// far; keys and values (n_layer, B, KV, max_len, D) get slot S; logits (B, vocab). isa 0 picks the
// best. fmt: each weight's format (qdecode.h; null: all float32). Returns 0, or 1 for a token id
// outside the vocabulary, 2 for an isa this CPU lacks.
int slm_decode_step(const int64_t* cfg, const float* const* w, float eps, const int64_t* ids, const int64_t* start,
                    int64_t B, int64_t S, int64_t max_len, float* kc, float* vc, float* logits, int threads, int isa,
                    const int64_t* fmt) {
    const int best = best_isa();
    if (isa == kAuto) isa = best;
    if (isa > best || isa < kScalar) return 2;
    const int64_t V = cfg[kVocab], C = cfg[kEmbd], H = cfg[kHeads], KV = cfg[kKV], D = cfg[kHeadDim];
    const int64_t hidden = cfg[kHidden];
    for (int64_t b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= V) return 1;
    std::lock_guard<std::mutex> lock(step_mutex);
    const int64_t qkv_width = (H + 2 * KV) * D;
    workspace.resize(B * (3 * C + qkv_width + hidden));
    Step s{cfg, w, eps, start, B, S, max_len, kc, vc, matvec_for(isa)};
    s.fmt = fmt, s.isa = isa;
    s.x = workspace.data(), s.h = s.x + B * C, s.att = s.h + B * C, s.qkv = s.att + B * C, s.act = s.qkv + B * qkv_width;
    s.logits = logits;
    const bool ln = cfg[kLayerNorm];
    for (int64_t b = 0; b < B; b++) {
        const float* e = w[kTokEmb] + ids[b] * C;
        if (fmt_of(s, kTokEmb)) slmq::dequantize_row(fmt[kTokEmb], w[kTokEmb], C, ids[b], s.h), e = s.h;
        const int64_t pos = std::max<int64_t>(S - start[b], 0);
        for (int64_t i = 0; i < C; i++) s.x[b * C + i] = e[i] + (w[kPosEmb] ? w[kPosEmb][pos * C + i] : 0.f);
    }
    for (int64_t l = 0; l < cfg[kLayers]; l++) {
        const float* const* lw = w + kGlobal + l * kPerLayer;
        s.layer = l;
        for (int64_t b = 0; b < B; b++) norm(s.x + b * C, lw[kN1w], lw[kN1b], C, eps, ln, s.h + b * C);
        const int64_t li = kGlobal + l * kPerLayer;
        product(s, threads, li + kQkvW, lw[kQkvB], s.h, C, qkv_width, s.qkv, qkv_width, false);
        pool().run(threads, B * KV, attention_task, &s);
        product(s, threads, li + kProjW, lw[kProjB], s.att, C, C, s.x, C, true);
        for (int64_t b = 0; b < B; b++) norm(s.x + b * C, lw[kN2w], lw[kN2b], C, eps, ln, s.h + b * C);
        prepare(s, li + kUpW, s.h, C);
        pool().run(threads, (hidden + kRows - 1) / kRows, up_task, &s);
        product(s, threads, li + kDownW, lw[kDownB], s.act, hidden, C, s.x, C, true);
    }
    for (int64_t b = 0; b < B; b++) norm(s.x + b * C, w[kNormW], w[kNormB], C, eps, ln, s.h + b * C);
    product(s, threads, kHeadW, w[kHeadB], s.h, C, V, logits, V, false);
    return 0;
}

}  // extern "C"
