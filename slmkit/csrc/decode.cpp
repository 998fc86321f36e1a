// One decode step of a float32 GPT in one call: every layer (norms, rotary or learned positions,
// attention over the KV cache with grouped-query heads, GELU or SwiGLU, biases) and the head, for
// a batch of rows that each have their own first real slot (left padding). Weight matrices are
// float32 or bf16 panels, or int8/int4 blocks as slm quantize stored them (qdecode.cpp). See
// slmkit/decode/native.py.
//
// Speed at batch 1 is reading the weights once per token: the matrix-vector products are written
// with AVX-512 and AVX2 intrinsics (functions with target attributes, picked at run time from the
// CPU's features, or forced by the caller) and a scalar loop elsewhere (ARM builds and runs that).
// Threads: a small pool of our own. Work is cut into tasks (32 output rows of a product, one
// (row, kv head) of attention) claimed from one atomic counter, a run of them at a time (a share of
// what is left, shrinking to one task at the end: fewer trips of the counter's cache line between
// cores), so the caller never waits for a worker that the OS has not scheduled: it takes the
// remaining tasks itself. An idle worker spins for a short while (SLMKIT_DECODE_SPIN_US, default
// 100 us) and then sleeps on a condition variable: no thread burns a core between tokens. A caller
// may ask them to sleep at once after a step (Pool::rest; slm serve: its Python between steps
// outlasts the spin, and a spinning worker took a core from it, the event loop and the clients).
// Every output value is computed by one task in a fixed order, so the thread count never changes
// a result.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define SLM_X86 1
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <pthread.h>
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
            std::thread([this, id] {
#if defined(__linux__)
                pthread_setname_np(pthread_self(), "slm-decode");  // top -H, perf and bench/serve.py's CPU table
#endif
                loop(id);
            }).detach();  // lives as long as the process
        }
        resting_.store(false, std::memory_order_relaxed);
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
        const int64_t mine = work();
        while (done_.load(std::memory_order_acquire) + mine < n) cpu_relax();  // only tasks already claimed
    }

    // Idle workers sleep at once rather than spin until the next run(): the caller has long work of
    // its own to do first (slm_decode_step's rest).
    void rest() { resting_.store(true, std::memory_order_relaxed); }

  private:
    static constexpr uint64_t kGenMask = (1u << 24) - 1;
    static constexpr uint64_t kField = (1u << 20) - 1;

    // Claims tasks of the current job until none are left and returns how many it ran (a worker adds
    // them to done_ once, at the end: one write to that line per thread and job, not one per task).
    // A claim takes 1 / (2 threads) of the tasks left, at least one: a few claims per thread and
    // job, small ones last, so the threads still finish together. A claim that lands in the next
    // job (a worker that read the ticket, then slept while the caller finished the job and started
    // another) takes tasks of that job like any other: they run with that job's fn_, which the
    // ticket's release published, and the caller waits for them through done_.
    int64_t work() {
        int64_t did = 0;
        const int64_t share = std::max(2, active_.load(std::memory_order_relaxed) + 1) * 2;
        uint64_t t = ticket_.load(std::memory_order_acquire);
        for (;;) {
            const uint64_t n = (t >> 20) & kField, k = t & kField;
            if (k >= n) break;
            const uint64_t c = std::max<uint64_t>(1, (n - k) / share);
            if (!ticket_.compare_exchange_weak(t, t + c, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
            for (uint64_t i = k; i < k + c; i++) fn_(ctx_, (int64_t)i);
            did += (int64_t)c;
            t = ticket_.load(std::memory_order_acquire);
        }
        return did;
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
                if (i % 256 == 0 && (resting_.load(std::memory_order_relaxed) || std::chrono::steady_clock::now() - t0 > spin)) {
                    std::unique_lock<std::mutex> lock(mutex_);
                    sleepers_.fetch_add(1);
                    cv_.wait(lock, [&] { return wake_.load() != seen; });
                    sleepers_.fetch_sub(1);
                    t0 = std::chrono::steady_clock::now();
                }
            }
            seen = w;
            if (id < active_.load(std::memory_order_relaxed)) {
                const int64_t did = work();
                if (did) done_.fetch_add(did, std::memory_order_release);
            }
        }
    }

    // Each on its own cache line: the caller's spin on done_ and the workers' on wake_ do not take
    // the line the claims write to.
    std::vector<char> workers_;
    alignas(64) std::atomic<uint64_t> ticket_{0};  // generation (24 bits) | task count (20) | next task (20)
    alignas(64) std::atomic<int64_t> done_{0};
    alignas(64) std::atomic<uint32_t> wake_{0};
    std::atomic<int> sleepers_{0}, active_{0};
    std::atomic<bool> resting_{false};
    uint64_t gen_ = 0;
    TaskFn fn_ = nullptr;
    void* ctx_ = nullptr;
    alignas(64) std::mutex mutex_;
    std::condition_variable cv_;
};

// --------------------------------------------------------------------------- the products

// The weight matrices of the products (out x in, torch's layout) are packed once, when a decoder
// is made (slm_decode_pack), into the format its kernels read. Formats here: kF32 and kBF16, both
// panels: 16 output rows interleaved, panel p holding W[16 p + l][k] at [k][l] (zeros past the
// last row). A product then runs as outer products: for each k, 16 outputs of a panel gain
// W[., k] * x[b, k] for every batch row b the tile holds in registers, so each weight is read
// once per tile of batch rows (once per step for up to 6 rows with AVX-512) rather than once per
// row, and the batch costs arithmetic, not memory. bf16 weights are widened to fp32 in registers
// (a shift: bf16 is the top half of a float), so the arithmetic is fp32 on the weights' values.
// Every output is one chain of fused multiply-adds over k = 0 .. in-1, whatever the tile, the
// thread count or the instruction set, so none of them changes a bit of a result.
// A model's float matrices share one of these formats (cfg[kFormat]). Apart from them, any matrix
// may be int8/int4 blocks (qdecode.h; the per-tensor `fmt` of slm_decode_step): those are not
// repacked but read as slm quantize stored them, row after row; product() rounds the activations
// to int8 blocks once and slmq::matvec computes the integer products (any rows j0..j1).
//
// kBF16Dot: bf16 weights and bf16 activations, multiplied by AVX512-BF16's vdpbf16ps (two products
// per float lane). Its panels hold pairs: panel p, pair k2, lane l at [k2][l][2] = W[16 p + l][2 k2],
// W[16 p + l][2 k2 + 1] (a zero past an odd row length). Each product rounds its activations to
// bf16 pairs once (prepare); so the logits are those of the model with its matrices and the inputs
// of its products rounded to bf16. Only for CPUs with AVX512-BF16 (the caller checks
// slm_decode_has_bf16_dot), where it gives the same bits whatever the thread count or the batch.
enum Format { kF32 = 0, kBF16 = 1, kBF16Dot = 2 };
constexpr int64_t kPanel = 16;

int64_t panels(int64_t rows) { return (rows + kPanel - 1) / kPanel; }
bool known_format(int64_t format) { return format == kF32 || format == kBF16 || format == kBF16Dot; }
int64_t even(int64_t in) { return (in + 1) / 2 * 2; }  // a row's values in kBF16Dot's pairs
// The rows a packed matrix of `rows` rows takes (a product's output index j reads row j).
int64_t stored_rows(int64_t /*format*/, int64_t rows) { return panels(rows) * kPanel; }
int64_t packed_bytes(int64_t format, int64_t rows, int64_t in) {
    return stored_rows(format, rows) * (format == kBF16Dot ? even(in) : in) * (format == kF32 ? 4 : 2);
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// dst[k] = to_bf16(x[k]) for k < n, a vector at a time (the same integer rounding, so the same bits).
inline void to_bf16_n(const float* x, int64_t n, uint16_t* dst) {
    typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
    typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
    int64_t k = 0;
    for (; k + W <= n; k += W) {
        vu u;
        std::memcpy(&u, x + k, sizeof u);
        const vh h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, vh);
        std::memcpy(dst + k, &h, sizeof h);
    }
    for (; k < n; k++) dst[k] = to_bf16(x[k]);
}

inline float from_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename T>
void pack_panels(const float* src, int64_t rows, int64_t in, T* dst) {
    for (int64_t p = 0; p < panels(rows); p++)
        for (int64_t k = 0; k < in; k++)
            for (int64_t l = 0; l < kPanel; l++) {
                const int64_t j = p * kPanel + l;
                const float v = j < rows ? src[j * in + k] : 0.f;
                T* d = dst + (p * in + k) * kPanel + l;
                if constexpr (sizeof(T) == 2) *d = to_bf16(v); else *d = v;
            }
}

// kBF16Dot's panels: pairs of consecutive values of a row per lane (see Format).
void pack_pairs(const float* src, int64_t rows, int64_t in, uint16_t* dst) {
    const int64_t in2 = even(in) / 2;
    for (int64_t p = 0; p < panels(rows); p++)
        for (int64_t k2 = 0; k2 < in2; k2++)
            for (int64_t l = 0; l < kPanel; l++)
                for (int64_t h = 0; h < 2; h++) {
                    const int64_t j = p * kPanel + l, k = 2 * k2 + h;
                    dst[((p * in2 + k2) * kPanel + l) * 2 + h] = to_bf16(j < rows && k < in ? src[j * in + k] : 0.f);
                }
}

// dots[b * ldd + (j - j0)] = W[j] . X[b] for the panels holding rows j0 <= j < j1 (j0 a multiple
// of 16; whole panels are written, so ldd >= j1 - j0 rounded up to 16) and B rows of X.
typedef void (*MatvecFn)(const void* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                         int64_t j0, int64_t j1, float* dots, int64_t ldd);

template <typename T>
void matvec_scalar(const void* Wv, int64_t in, const float* X, int64_t ldx, int64_t B,
                   int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    const T* W = (const T*)Wv;
    for (int64_t p = j0 / kPanel; p < panels(j1); p++)
        for (int64_t b = 0; b < B; b++) {
            float acc[kPanel] = {};
            const T* w = W + p * in * kPanel;
            const float* x = X + b * ldx;
            for (int64_t k = 0; k < in; k++)
                for (int64_t l = 0; l < kPanel; l++) {
                    float wl;
                    if constexpr (sizeof(T) == 2) wl = from_bf16(w[k * kPanel + l]); else wl = w[k * kPanel + l];
                    acc[l] = __builtin_fmaf(wl, x[k], acc[l]);
                }
            std::copy(acc, acc + kPanel, dots + b * ldd + (p * kPanel - j0));
        }
}

typedef void (*TileFn)(const void* W, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd);

// Runs the tiles over panels j0/16 .. and the batch: NP panels by BB rows at a time (the largest
// the table has), the panels outside so that a task's weights stay in the core's caches while
// they serve every batch row.
template <int NPmax, int BBmax, int Elem>
inline void run_tiles(const TileFn (&table)[BBmax][NPmax], const void* W, int64_t in, const float* X, int64_t ldx,
                      int64_t B, int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    const char* Wb = (const char*)W;
    const int64_t p0 = j0 / kPanel, p1 = panels(j1);
    for (int64_t p = p0; p < p1; p += NPmax) {
        const int64_t np = std::min<int64_t>(NPmax, p1 - p);
        for (int64_t b = 0; b < B; b += BBmax) {
            const int64_t bb = std::min<int64_t>(BBmax, B - b);
            table[bb - 1][np - 1](Wb + p * in * kPanel * Elem, in, X + b * ldx, ldx, dots + b * ldd + (p - p0) * kPanel, ldd);
        }
    }
}

#if defined(SLM_X86)
#define SLM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define SLM_AVX2 __attribute__((target("avx2,fma")))

SLM_AVX512 inline __m512 wload512(const float* p) { return _mm512_loadu_ps(p); }
SLM_AVX512 inline __m512 wload512(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// BB rows of X by NP panels: BB x NP accumulators of 16 outputs.
template <typename T, int BB, int NP>
SLM_AVX512 void tile512(const void* Wv, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd) {
    const T* W = (const T*)Wv;
    __m512 acc[BB][NP];
    for (int b = 0; b < BB; b++)
        for (int p = 0; p < NP; p++) acc[b][p] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        __m512 w[NP];
        for (int p = 0; p < NP; p++) w[p] = wload512(W + (p * in + k) * kPanel);
        for (int b = 0; b < BB; b++) {
            const __m512 x = _mm512_set1_ps(X[b * ldx + k]);
            for (int p = 0; p < NP; p++) acc[b][p] = _mm512_fmadd_ps(w[p], x, acc[b][p]);
        }
    }
    for (int b = 0; b < BB; b++)
        for (int p = 0; p < NP; p++) _mm512_storeu_ps(dots + b * ldd + p * kPanel, acc[b][p]);
}

constexpr int kNP512 = 4, kBB512 = 6;  // 24 of the 32 zmm registers accumulate

template <typename T, int... B>
struct Table512 {
    TileFn f[kBB512][kNP512] = {{&tile512<T, B, 1>, &tile512<T, B, 2>, &tile512<T, B, 3>, &tile512<T, B, 4>}...};
};

template <typename T>
SLM_AVX512 void matvec_avx512(const void* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                              int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    static const Table512<T, 1, 2, 3, 4, 5, 6> t;
    run_tiles<kNP512, kBB512, sizeof(T)>(t.f, W, in, X, ldx, B, j0, j1, dots, ldd);
}

#define SLM_AVX512BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))

// kBF16Dot: BB rows of X (as bf16 pairs, one 32-bit word per pair; ldx in pairs) by NP panels,
// `in` even. vdpbf16ps adds both products of a pair to each lane's accumulator.
template <int BB, int NP>
SLM_AVX512BF16 void tile512_dot(const void* Wv, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd) {
    const uint16_t* W = (const uint16_t*)Wv;
    const uint32_t* Xp = (const uint32_t*)X;
    const int64_t in2 = in / 2;
    __m512 acc[BB][NP];
    for (int b = 0; b < BB; b++)
        for (int p = 0; p < NP; p++) acc[b][p] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < in2; k2++) {
        __m512i w[NP];
        for (int p = 0; p < NP; p++) w[p] = _mm512_loadu_si512((const void*)(W + (p * in2 + k2) * 2 * kPanel));
        for (int b = 0; b < BB; b++) {
            const __m512i x = _mm512_set1_epi32((int)Xp[b * ldx + k2]);
            for (int p = 0; p < NP; p++) acc[b][p] = _mm512_dpbf16_ps(acc[b][p], (__m512bh)w[p], (__m512bh)x);
        }
    }
    for (int b = 0; b < BB; b++)
        for (int p = 0; p < NP; p++) _mm512_storeu_ps(dots + b * ldd + p * kPanel, acc[b][p]);
}

template <int... B>
struct TableDot {
    TileFn f[kBB512][kNP512] = {{&tile512_dot<B, 1>, &tile512_dot<B, 2>, &tile512_dot<B, 3>, &tile512_dot<B, 4>}...};
};

// X: the activations as bf16 pairs (prepare), ldx in pairs.
SLM_AVX512BF16 void matvec_dot(const void* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                               int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    static const TableDot<1, 2, 3, 4, 5, 6> t;
    run_tiles<kNP512, kBB512, 2>(t.f, W, even(in), X, ldx, B, j0, j1, dots, ldd);
}

bool has_bf16_dot() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

SLM_AVX2 inline void wload256(const float* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
}
SLM_AVX2 inline void wload256(const uint16_t* p, __m256& lo, __m256& hi) {
    const __m256i h = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
}

// BB rows of X by NP panels (two ymm each): 2 BB NP accumulators of 8 outputs.
template <typename T, int BB, int NP>
SLM_AVX2 void tile256(const void* Wv, int64_t in, const float* X, int64_t ldx, float* dots, int64_t ldd) {
    const T* W = (const T*)Wv;
    __m256 acc[BB][2 * NP];
    for (int b = 0; b < BB; b++)
        for (int h = 0; h < 2 * NP; h++) acc[b][h] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k++) {
        __m256 x[BB];
        for (int b = 0; b < BB; b++) x[b] = _mm256_set1_ps(X[b * ldx + k]);
        for (int p = 0; p < NP; p++) {
            __m256 lo, hi;
            wload256(W + (p * in + k) * kPanel, lo, hi);
            for (int b = 0; b < BB; b++) {
                acc[b][2 * p] = _mm256_fmadd_ps(lo, x[b], acc[b][2 * p]);
                acc[b][2 * p + 1] = _mm256_fmadd_ps(hi, x[b], acc[b][2 * p + 1]);
            }
        }
    }
    for (int b = 0; b < BB; b++)
        for (int h = 0; h < 2 * NP; h++) _mm256_storeu_ps(dots + b * ldd + h * 8, acc[b][h]);
}

constexpr int kNP256 = 2, kBB256 = 3;  // 12 of the 16 ymm registers accumulate

template <typename T, int... B>
struct Table256 {
    TileFn f[kBB256][kNP256] = {{&tile256<T, B, 1>, &tile256<T, B, 2>}...};
};

template <typename T>
SLM_AVX2 void matvec_avx2(const void* W, int64_t in, const float* X, int64_t ldx, int64_t B,
                          int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    static const Table256<T, 1, 2, 3> t;
    run_tiles<kNP256, kBB256, sizeof(T)>(t.f, W, in, X, ldx, B, j0, j1, dots, ldd);
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

// The product kernel for an instruction set and a weight format.
MatvecFn matvec_for(int isa, int64_t format) {
    const bool bf16 = format == kBF16;
#if defined(SLM_X86)
    if (format == kBF16Dot) return isa == kAvx512 && has_bf16_dot() ? matvec_dot : nullptr;
    if (isa == kAvx512) return bf16 ? matvec_avx512<uint16_t> : matvec_avx512<float>;
    if (isa == kAvx2) return bf16 ? matvec_avx2<uint16_t> : matvec_avx2<float>;
#endif
    (void)isa;
    if (format == kBF16Dot) return nullptr;
    return bf16 ? matvec_scalar<uint16_t> : matvec_scalar<float>;
}

// Panels per task of a product: as many as an AVX-512 tile holds (4), fewer where that would leave
// fewer than three tasks per thread (proj and down at the stories15m shape: 3-panel tiles, not 2). The tiling changes no result (see above), only the load balance.
int64_t task_panels(int64_t n_panels, int threads) {
    int64_t per = 4;
    while (per > 1 && (n_panels + per - 1) / per < 3 * threads) per--;
    return per;
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

// silu(a) * u (swiglu) or gelu_tanh(a), one vector, with vec.h's exp (x <= 0).
inline vf activation(vf a, vf u, bool swiglu) {
    const vf zero = splat(0.f), one = splat(1.f);
    if (swiglu) {  // sigmoid(a) from e = exp(-|a|): 1 / (1 + e) for a >= 0, e / (1 + e) below
        const vf e = vexp(select(a >= zero, -a, a));
        return a * select(a >= zero, one, e) / (one + e) * u;
    }
    // tanh(y) = sign(y) (1 - e) / (1 + e) with e = exp(-2|y|)
    const vf y = splat(0.7978845608028654f) * (a + splat(0.044715f) * a * a * a);
    const vf e = vexp(select(y >= zero, splat(-2.f) * y, splat(2.f) * y));
    const vf t = (one - e) / (one + e);
    return splat(0.5f) * a * (one + select(y >= zero, t, -t));
}

// out = silu(gate) * up (swiglu) or gelu_tanh(gate), n values. Whole vectors go from memory to
// memory; only a tail passes through a zero-padded copy (a vector stored to the stack and read
// back lane by lane stalled on every lane: it was most of the MLP's time outside its products).
void activate(const float* gate, const float* up, int64_t n, bool swiglu, float* out) {
    int64_t i = 0;
    for (; i + W <= n; i += W) store(out + i, activation(load(gate + i), swiglu ? load(up + i) : splat(0.f), swiglu));
    if (i == n) return;
    float g[W] = {}, u[W] = {}, r[W];
    std::copy(gate + i, gate + n, g);
    if (swiglu) std::copy(up + i, up + n, u);
    store(r, activation(load(g), load(u), swiglu));
    std::copy(r, r + (n - i), out + i);
}

// --------------------------------------------------------------------------- the step

// cfg: vocab, n_layer, n_head, n_kv_head, head_dim, n_embd, hidden, layernorm, rope, swiglu, the
// format of the packed weight matrices (qkv, proj, up, down, head; see "the products") and the
// element type of the KV cache (KVType)
enum { kVocab, kLayers, kHeads, kKV, kHeadDim, kEmbd, kHidden, kLayerNorm, kRope, kSwiGLU, kFormat, kKVType, kCfg };
// The KV cache's elements: float32, or bf16 (uint16, the top half of a float32: a key or value is
// rounded to nearest even when stored, as torch's .to(torch.bfloat16), and widened back, exactly,
// when read). bf16 halves the bytes attention reads per step, which at a batch of 16 rows is as
// much as the weights; the arithmetic stays float32.
enum KVType { kKVF32 = 0, kKVBF16 = 1 };
// w: tok_emb, pos_emb, rope_cos, rope_sin, norm_w, norm_b, head_w, head_b, then per layer (the
// matrices packed by slm_decode_pack; a SwiGLU up matrix as its gate rows packed, then its up rows):
enum { kTokEmb, kPosEmb, kCos, kSin, kNormW, kNormB, kHeadW, kHeadB, kGlobal };
enum { kN1w, kN1b, kQkvW, kQkvB, kProjW, kProjB, kN2w, kN2b, kUpW, kUpB, kDownW, kDownB, kPerLayer };

struct Step {
    const int64_t* cfg;
    const float* const* w;
    float eps;
    const int64_t* start;
    int64_t B, S, max_len;
    void *kc, *vc;  // KVType elements
    int threads;
    MatvecFn matvec;
    float *x, *h, *qkv, *att, *act, *logits;
    int64_t layer;
    // the product of the current phase
    const void* W;
    const float *bias, *X;
    int64_t in, out, ldx, ldy, rows;  // rows: output rows per task (whole panels)
    float* Y;
    const int64_t* yrow;  // the row of Y that row b of X writes (null: row b)
    bool add;
    // int8/int4 weights (qdecode.h): each tensor's format (null: none), the instruction set, the
    // current product's weight format (0: the model's float format) and its activations quantized
    // once (slmq::quantize_rows)
    const int64_t* fmt;
    int isa;
    int64_t wfmt;
    void* xq;
    const uint32_t* xb;  // kBF16Dot: the current product's activations as bf16 pairs, else null
    int64_t kv_rows;  // rows of the KV buffers (>= B: a batch keeps room for rows that join later)
    const int64_t* kv_row;  // the cache row (and row of logits) of batch row b (null: row b)
    const int64_t* slot;  // the slot batch row b writes (null: S for every row; see slm_decode_step's extra)
};

inline int64_t cache_row(const Step& s, int64_t b) { return s.kv_row ? s.kv_row[b] : b; }
inline int64_t slot_of(const Step& s, int64_t b) { return s.slot ? s.slot[b] : s.S; }

inline int64_t fmt_of(const Step& s, int64_t i) { return s.fmt ? s.fmt[i] : 0; }

// dots = rows j0..j1 of W times the B rows of X: W's blocks times s.xq (X quantized) when wfmt is
// int8/int4, else the model's float panels (s.matvec).
inline void matvec_any(const Step& s, const void* W, int64_t wfmt, int64_t in, const float* X, int64_t ldx,
                       int64_t j0, int64_t j1, float* dots, int64_t ldd) {
    if (wfmt) slmq::matvec(wfmt, s.isa, W, in, s.xq, s.B, j0, j1, dots, ldd);
    else if (s.xb) s.matvec(W, in, (const float*)s.xb, even(in) / 2, s.B, j0, j1, dots, ldd);
    else s.matvec(W, in, X, ldx, s.B, j0, j1, dots, ldd);
}

thread_local std::vector<float> tls;  // per-thread scratch: dots of a task, attention scores

float* scratch(int64_t n) {
    if ((int64_t)tls.size() < n) tls.resize(n);
    return tls.data();
}

// Y[b, j] (+)= W[j] . X[b] + bias[j] for the task's rows.
void product_task(void* p, int64_t task) {
    Step& s = *(Step*)p;
    const int64_t j0 = task * s.rows, j1 = std::min(s.out, j0 + s.rows), R = j1 - j0;
    float* dots = scratch(s.B * s.rows);
    matvec_any(s, s.W, s.wfmt, s.in, s.X, s.ldx, j0, j1, dots, s.rows);
    for (int64_t b = 0; b < s.B; b++) {
        float* y = s.Y + (s.yrow ? s.yrow[b] : b) * s.ldy + j0;
        const float* d = dots + b * s.rows;
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
    const int64_t L = s.rows, j0 = task * L, j1 = std::min(hidden, j0 + L), R = j1 - j0;
    const float* const* lw = s.w + kGlobal + s.layer * kPerLayer;
    const float* bu = lw[kUpB];
    const void* Wu = lw[kUpW];
    // where the up rows start: right after the gate rows in blocks, after their panels otherwise
    const int64_t up_rows = s.wfmt ? hidden : stored_rows(s.cfg[kFormat], hidden);
    float* gate = scratch(2 * s.B * L);
    float* up = gate + s.B * L;
    matvec_any(s, Wu, s.wfmt, C, s.h, C, j0, j1, gate, L);
    if (swiglu) matvec_any(s, Wu, s.wfmt, C, s.h, C, up_rows + j0, up_rows + j1, up, L);
    for (int64_t b = 0; b < s.B; b++) {
        if (bu)
            for (int64_t r = 0; r < R; r++) {
                gate[b * L + r] += bu[j0 + r];
                if (swiglu) up[b * L + r] += bu[hidden + j0 + r];
            }
        activate(gate + b * L, up + b * L, R, swiglu, s.act + b * hidden + j0);
    }
}

// --------------------------------------------------------------------------- attention

// One task is one (row, kv head) of a layer (attention_task_t): rotate its query heads and its key,
// store the key and value in slot S of the cache, then for each query head of the group: scores
// over the row's n keys (from its first real slot), softmax, the weighted sum of the values. A
// task's values are computed by it alone, in a fixed order, whatever the batch, the other rows or
// the thread count. The arithmetic is float32; a bf16 cache's elements are widened exactly.
//
// Scores come W keys at a time: per key, one vector of products summed over D's chunks, then the
// W vectors reduced together by a tree of lane shuffles (2 shuffles and an add per pair, log2 W
// levels) instead of one horizontal sum per key; the scale and the mask (lanes past the last key
// get -inf) apply to the block's vector, and the row's maximum is kept as it goes. A block past
// the last key reads the last key again (valid memory, its lanes masked), so every key gets the
// same arithmetic whatever n is. The softmax is one pass (exp of score minus maximum, and their
// sum); the weighted sum of the values keeps D in registers and adds the keys of kGroups
// interleaved groups in order (kGroups independent chains of adds, summed at the end), then
// divides by the sum.
//
// A bf16 cache whose head size is a multiple of W (stories15m: 48, W 16 or 8) takes the word
// path: its rows are read as 32-bit words of two elements, with no widening instruction (a
// word shifted left by 16 is its first element as a float, the word with its low half cleared
// its second), and q is split once per head into the words' even and odd elements (WordQuery),
// so the products pair the same values as the general code's. Where D / 2 words are not whole
// vectors (D an odd multiple of W: 48 with AVX-512), keys go in pairs, a pair's D words filling
// D / W vectors (the middle one ending the first key and starting the second), and the tree
// starts from pairs; the values' sums keep the pair's two keys apart and add them at the end (a
// last key without a partner is paired with a copy of zeros).
// Other head sizes and float caches take the general code (loadw, key_tree, weighted_values).
constexpr int kChunks = 4;  // vectors of the values' sum held in registers at a time (general code)
constexpr int kAhead = 4;   // blocks of W keys prefetched ahead in the scores
constexpr int kGroups = 2;  // interleaved groups of keys in the values' sum

// Rotary positions on one head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) over its two halves, a
// vector at a time; where half is not a multiple of W the last vector overlaps the one before it
// (its inputs read first, so both compute the same values there).
void rotate(float* x, const float* c, const float* sn, int64_t half) {
    if (half < W) {
        for (int64_t i = 0; i < half; i++) {
            const float x1 = x[i], x2 = x[i + half];
            x[i] = x1 * c[i] - x2 * sn[i];
            x[i + half] = x2 * c[i] + x1 * sn[i];
        }
        return;
    }
    const int64_t t = half - W;
    const vf t1 = load(x + t), t2 = load(x + half + t);
    for (int64_t i = 0; i + W <= half; i += W) {
        const vf x1 = load(x + i), x2 = load(x + half + i), ci = load(c + i), si = load(sn + i);
        store(x + i, x1 * ci - x2 * si);
        store(x + half + i, x2 * ci + x1 * si);
    }
    if (half % W) {
        const vf ci = load(c + t), si = load(sn + t);
        store(x + t, t1 * ci - t2 * si);
        store(x + half + t, t2 * ci + t1 * si);
    }
}

// Asks for the cache lines of n elements from p on (nothing for n <= 0). Always inlined, as is
// prefetch_block: GCC 12 found a function that only prefetches free of side effects and deleted
// the calls to it (the scores' prefetches were gone).
#define SLM_INLINE inline __attribute__((always_inline))
template <typename T>
SLM_INLINE void prefetch(const T* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + i);
}

// A cache element as a float, and W of them as a vector: bf16 (uint16) widened by a shift, exactly
// (vpmovzxwd + vpslld with AVX-512 or AVX2, whichever the library is built for: written with
// intrinsics, as GCC split the generic conversion into halves and reassembled them).
inline float value(const float* p) { return *p; }
inline float value(const uint16_t* p) { return from_bf16(*p); }
inline vf loadw(const float* p) { return load(p); }
inline vf loadw(const uint16_t* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
    typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
    typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
    vh h;
    std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);  // unsigned: the shift into bit 31 is defined
#endif
}

// A row of D floats into the cache as T (bf16: to_bf16's rounding, a vector at a time).
inline void put_row(float* dst, const float* x, int64_t D) { std::memcpy(dst, x, D * sizeof(float)); }
inline void put_row(uint16_t* dst, const float* x, int64_t D) { to_bf16_n(x, D, dst); }

// Half h of the tree: lo takes the even h-lane chunks of (x, y), hi the odd ones; lo + hi holds
// x's keys (in their order) then y's, each summed over half as many lanes as before.
#if defined(__clang__) || __GNUC__ >= 12
#define SLM_SHUFFLE __builtin_shufflevector
#endif
template <int h>
inline vf pair_sum(vf x, vf y) {
#if defined(SLM_SHUFFLE) && defined(__AVX512F__)  // W 16
    if constexpr (h == 8)
        return SLM_SHUFFLE(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SLM_SHUFFLE(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    else if constexpr (h == 4)
        return SLM_SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SLM_SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    else if constexpr (h == 2)
        return SLM_SHUFFLE(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SLM_SHUFFLE(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    else
        return SLM_SHUFFLE(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
             + SLM_SHUFFLE(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif defined(SLM_SHUFFLE)  // W 8
    if constexpr (h == 4)
        return SLM_SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + SLM_SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
    else if constexpr (h == 2)
        return SLM_SHUFFLE(x, y, 0, 1, 4, 5, 8, 9, 12, 13) + SLM_SHUFFLE(x, y, 2, 3, 6, 7, 10, 11, 14, 15);
    else
        return SLM_SHUFFLE(x, y, 0, 2, 4, 6, 8, 10, 12, 14) + SLM_SHUFFLE(x, y, 1, 3, 5, 7, 9, 11, 13, 15);
#else  // the same tree, lane by lane
    vf z;
    for (int i = 0; i < W; i++) {
        const int at = 2 * (i / h) * h + i % h;  // (x, y)'s chunk 2 c, and 2 c + 1 after it
        z[i] = at < W ? x[at] + x[at + h] : y[at - W] + y[at - W + h];
    }
    return z;
#endif
}

// W words of a bf16 cache (two elements each), loaded from p; a word's first element (its low
// half: the cache is little-endian, as x86 and ARM are) and its second as floats, exactly. The
// empty asm keeps the words in a register: GCC folded the load into both the shift and the and,
// two loads per vector, and the loads bounded the word path (with one: a 16-row stories15m
// step's attention tasks on one thread in 121 us, not 146).
typedef uint32_t vw __attribute__((vector_size(W * sizeof(uint32_t))));
inline vw load_words(const uint16_t* p) {
    vw v;
    std::memcpy(&v, p, sizeof v);
#if defined(__AVX2__) || defined(__AVX512F__)  // a vw is one register
    __asm__("" : "+v"(v));
#endif
    return v;
}
inline vf first_of(vw w) { return (vf)(w << 16); }
inline vf second_of(vw w) { return (vf)(w & 0xffff0000u); }

// Lane shuffles of the word path: (x, y)'s even lanes and its odd ones; (x, y) interleaved, its
// first W lanes (zip_lo) and its last (zip_hi).
#if defined(SLM_SHUFFLE) && defined(__AVX512F__)
#define SLM_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define SLM_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define SLM_ZIPLO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define SLM_ZIPHI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif defined(SLM_SHUFFLE)
#define SLM_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define SLM_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define SLM_ZIPLO 0, 8, 1, 9, 2, 10, 3, 11
#define SLM_ZIPHI 4, 12, 5, 13, 6, 14, 7, 15
#endif
#if defined(SLM_SHUFFLE)
inline vf evens(vf x, vf y) { return SLM_SHUFFLE(x, y, SLM_EVEN); }
inline vf odds(vf x, vf y) { return SLM_SHUFFLE(x, y, SLM_ODD); }
inline vf zip_lo(vf x, vf y) { return SLM_SHUFFLE(x, y, SLM_ZIPLO); }
inline vf zip_hi(vf x, vf y) { return SLM_SHUFFLE(x, y, SLM_ZIPHI); }
#else  // lane by lane
inline vf evens(vf x, vf y) { vf z; for (int i = 0; i < W; i++) z[i] = 2 * i < W ? x[2 * i] : y[2 * i - W]; return z; }
inline vf odds(vf x, vf y) { vf z; for (int i = 0; i < W; i++) z[i] = 2 * i + 1 < W ? x[2 * i + 1] : y[2 * i + 1 - W]; return z; }
inline vf zip_lo(vf x, vf y) { vf z; for (int i = 0; i < W / 2; i++) z[2 * i] = x[i], z[2 * i + 1] = y[i]; return z; }
inline vf zip_hi(vf x, vf y) { vf z; for (int i = 0; i < W / 2; i++) z[2 * i] = x[i + W / 2], z[2 * i + 1] = y[i + W / 2]; return z; }
#endif

// x with lane i moved to lane i ^ h: partners h lanes apart swapped.
template <int h>
inline vf swap_lanes(vf x) {
#if defined(SLM_SHUFFLE) && defined(__AVX512F__)
    if constexpr (h == 8) return SLM_SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    else if constexpr (h == 4) return SLM_SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    else if constexpr (h == 2) return SLM_SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    else return SLM_SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#elif defined(SLM_SHUFFLE)
    if constexpr (h == 4) return SLM_SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
    else if constexpr (h == 2) return SLM_SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
    else return SLM_SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
#else
    vf z;
    for (int i = 0; i < W; i++) z[i] = x[i ^ h];
    return z;
#endif
}

// The sum and the maximum of x's lanes in log2 W dependent steps (vec.h's hsum and hmax take W):
// each lane gains its partner h lanes away, h = W / 2 .. 1.
template <int h = W / 2>
inline float lane_sum(vf x) {
    if constexpr (h == 0) return x[0];
    else return lane_sum<h / 2>(x + swap_lanes<h>(x));
}
template <int h = W / 2>
inline float lane_max(vf x) {
    if constexpr (h == 0) return x[0];
    else return lane_max<h / 2>(vmax(x, swap_lanes<h>(x)));
}

// ---- the general code: any head size, float or bf16 cache

// The products of q and key j (the last key for j >= n) summed over D's whole vectors: one
// vector, its lanes still to add. qv: q's NC vectors (NC 0: read q, D / W of them).
template <int NC, typename T>
inline vf key_products(const vf* qv, const float* q, const T* K, int64_t j, int64_t n, int64_t D) {
    const T* k = K + std::min(j, n - 1) * D;
    vf a = splat(0.f);
    if constexpr (NC > 0)
        for (int c = 0; c < NC; c++) a += qv[c] * loadw(k + c * W);
    else
        for (int64_t d = 0; d + W <= D; d += W) a += load(q + d) * loadw(k + d);
    return a;
}

// Keys j .. j + W / h - 1, each summed over h lanes of the result (h = 1: one score per lane).
// Depth first, so a handful of vectors are live at a time, not W (which spilled to the stack).
template <int h, int NC, typename T>
inline vf key_tree(const vf* qv, const float* q, const T* K, int64_t j, int64_t n, int64_t D) {
    if constexpr (h == W) return key_products<NC>(qv, q, K, j, n, D);
    else return pair_sum<h>(key_tree<2 * h, NC>(qv, q, K, j, n, D), key_tree<2 * h, NC>(qv, q, K, j + W / (2 * h), n, D));
}

// A block's scores, scaled, lanes past the last key -inf; mx takes their maximum.
inline vf finish_block(vf s, int64_t j0, int64_t n, float scale, vf& mx) {
    const vf lanes = splat((float)(n - j0)) - __builtin_convertvector(lane_index(), vf);  // > 0: a key
    s = select(lanes > splat(0.f), s * splat(scale), splat(-INFINITY));
    mx = vmax(mx, s);
    return s;
}

// Prefetches for the scores' block j0: the keys kAhead blocks on, and this block's values, from
// memory while it computes (a batch's caches outgrow L2; the hardware's prefetchers start late).
template <typename T>
SLM_INLINE void prefetch_block(const T* K, const T* V, int64_t j0, int64_t n, int64_t D) {
    prefetch(K + (j0 + kAhead * W) * D, std::min<int64_t>(W, n - j0 - kAhead * W) * D);
    if (V) prefetch(V + j0 * D, std::min<int64_t>(W, n - j0) * D);
}

// scores[j] = scale q . K[j] for j < n, -inf up to n rounded up to W; returns their maximum.
// V (or null): the values, prefetched a block at a time for the values' sum. NC: D / W when the
// caller knows it at compile time (the query's vectors then stay in registers), else 0; the
// arithmetic is the same either way.
template <int NC, typename T>
float attention_scores_n(const float* q, const T* K, const T* V, int64_t n, int64_t D, float scale, float* scores) {
    const int64_t full = D / W * W;
    vf qv[NC ? NC : 1];
    for (int c = 0; c < NC; c++) qv[c] = load(q + c * W);
    vf mx = splat(-INFINITY);
    for (int64_t j0 = 0; j0 < n; j0 += W) {
        prefetch_block(K, V, j0, n, D);
        vf s = key_tree<1, NC>(qv, q, K, j0, n, D);
        if (full < D)
            for (int l = 0; l < W; l++) {
                const T* k = K + std::min(j0 + l, n - 1) * D;
                float t = 0.f;
                for (int64_t d = full; d < D; d++) t += q[d] * value(k + d);
                s[l] += t;
            }
        store(scores + j0, finish_block(s, j0, n, scale, mx));
    }
    return lane_max(mx);
}

template <typename T>
float attention_scores(const float* q, const T* K, const T* V, int64_t n, int64_t D, float scale, float* scores) {
    switch (D / W) {
        case 1: return attention_scores_n<1, T>(q, K, V, n, D, scale, scores);
        case 2: return attention_scores_n<2, T>(q, K, V, n, D, scale, scores);
        case 3: return attention_scores_n<3, T>(q, K, V, n, D, scale, scores);
        case 4: return attention_scores_n<4, T>(q, K, V, n, D, scale, scores);
        case 6: return attention_scores_n<6, T>(q, K, V, n, D, scale, scores);
        case 8: return attention_scores_n<8, T>(q, K, V, n, D, scale, scores);
        default: return attention_scores_n<0, T>(q, K, V, n, D, scale, scores);
    }
}

// out[d0 .. d0 + C W) = inv * sum over j < n of p[j] V[j][d0 ..]: key j in group j % kGroups (the
// keys after the last whole round in group 0), each group's sum in C registers, keys in order.
template <int C, typename T>
inline void weighted_values(const float* p, const T* V, int64_t n, int64_t D, int64_t d0, float inv, float* out) {
    vf acc[kGroups][C];
    for (int g = 0; g < kGroups; g++)
        for (int i = 0; i < C; i++) acc[g][i] = splat(0.f);
    int64_t j = 0;
    for (; j + kGroups <= n; j += kGroups)
        for (int g = 0; g < kGroups; g++) {
            const vf pj = splat(p[j + g]);
            const T* v = V + (j + g) * D + d0;
            for (int i = 0; i < C; i++) acc[g][i] += pj * loadw(v + i * W);
        }
    for (; j < n; j++) {
        const vf pj = splat(p[j]);
        for (int i = 0; i < C; i++) acc[0][i] += pj * loadw(V + j * D + d0 + i * W);
    }
    for (int i = 0; i < C; i++) {
        vf t = acc[0][i];
        for (int g = 1; g < kGroups; g++) t += acc[g][i];
        store(out + d0 + i * W, t * splat(inv));
    }
}

// out = inv * sum over j < n of p[j] V[j], D values.
template <typename T>
void attention_values(const float* p, const T* V, int64_t n, int64_t D, float inv, float* out) {
    static_assert(kChunks == 4, "the cases below");
    const int64_t full = D / W * W;
    for (int64_t d0 = 0; d0 < full; d0 += kChunks * W) {
        switch (std::min<int64_t>(kChunks, (full - d0) / W)) {
            case 1: weighted_values<1, T>(p, V, n, D, d0, inv, out); break;
            case 2: weighted_values<2, T>(p, V, n, D, d0, inv, out); break;
            case 3: weighted_values<3, T>(p, V, n, D, d0, inv, out); break;
            default: weighted_values<4, T>(p, V, n, D, d0, inv, out); break;
        }
    }
    for (int64_t d = full; d < D; d++) {
        float t = 0.f;
        for (int64_t j = 0; j < n; j++) t += p[j] * value(V + j * D + d);
        out[d] = t * inv;
    }
}

// ---- the word path: a bf16 cache, D a multiple of W

// The layout of the word path for D = (2 F + Half) W: keys come in units of U (Half: pairs, so
// that a unit is whole vectors of words), NV vectors of W words each. Lane l of a unit's vector c
// holds word c W + l of the unit: key (c W + l) / (D / 2)'s word u = (c W + l) % (D / 2), its
// elements 2 u and 2 u + 1. With Half, vectors 0 .. F - 1 are the pair's first key, vector F
// ends it (W / 2 lanes) and starts the second, vectors F + 1 .. 2 F are the second key's.
template <int F, bool Half>
struct Words {
    static constexpr int64_t D = (2 * F + Half) * W;
    static constexpr int U = Half ? 2 : 1;
    static constexpr int NV = Half ? 2 * F + 1 : F;
};

// q's elements as a unit's words pair with them: e[c] lane l the even element of the word that lane
// l of vector c holds, o[c] the odd one.
template <int F, bool Half>
struct WordQuery {
    using L = Words<F, Half>;
    vf e[L::NV], o[L::NV];
    explicit WordQuery(const float* q) {
        for (int c = 0; c < L::NV; c++) {
            const int64_t u = c * W % (L::D / 2);  // the word of lane 0; lane W / 2 wraps to word 0 in vector F
            const vf x = load(q + 2 * u), y = load(q + (2 * u + W) % L::D);
            e[c] = evens(x, y), o[c] = odds(x, y);
        }
    }
};

// The products of q and the unit at k: one key's (or a pair's) vector of the tree, key_tree's leaf:
// one key summed over W lanes, or a pair, the first key over the first W / 2 lanes, the second over
// the others.
template <int F, bool Half>
inline vf unit_products(const WordQuery<F, Half>& q, const uint16_t* k) {
    vf p[Words<F, Half>::NV];
    for (int c = 0; c < Words<F, Half>::NV; c++) {
        const vw w = load_words(k + 2 * c * W);
        p[c] = q.e[c] * first_of(w);
        p[c] += q.o[c] * second_of(w);
    }
    if constexpr (!Half) {
        for (int c = 1; c < F; c++) p[0] += p[c];
        return p[0];
    } else if constexpr (F == 0) {
        return p[0];
    } else {
        for (int c = 1; c < F; c++) p[0] += p[c], p[F + 1] += p[F + 1 + c];
        return pair_sum<W / 2>(p[0], p[F + 1]) + p[F];
    }
}

// key_tree on the word path: units i .. of the block (at(i): the unit's first key), each key
// summed over h lanes of the result.
template <int h, int F, bool Half, typename At>
inline vf word_tree(const WordQuery<F, Half>& q, const At& at, int i) {
    if constexpr (h == W / Words<F, Half>::U) return unit_products(q, at(i));
    else return pair_sum<h>(word_tree<2 * h, F, Half>(q, at, i), word_tree<2 * h, F, Half>(q, at, i + W / (2 * h) / Words<F, Half>::U));
}

// attention_scores on the word path. Whole blocks read their units in place; the last block's
// units past the last key read tail: the last key, then (pairs) a key of zeros.
template <int F, bool Half>
float word_scores(const float* q, const uint16_t* K, const uint16_t* V, int64_t n, float scale, const uint16_t* tail,
                  float* scores) {
    using L = Words<F, Half>;
    const WordQuery<F, Half> wq(q);
    vf mx = splat(-INFINITY);
    int64_t j0 = 0;
    for (; j0 + W <= n; j0 += W) {
        prefetch_block(K, V, j0, n, L::D);
        const uint16_t* k = K + j0 * L::D;
        const auto at = [k](int i) { return k + i * L::U * L::D; };
        store(scores + j0, finish_block(word_tree<1, F, Half>(wq, at, 0), j0, n, scale, mx));
    }
    if (j0 < n) {
        if (V) prefetch(V + j0 * L::D, (n - j0) * L::D);
        const auto at = [&](int i) { const int64_t j = j0 + i * L::U; return j + L::U <= n ? K + j * L::D : tail; };
        store(scores + j0, finish_block(word_tree<1, F, Half>(wq, at, 0), j0, n, scale, mx));
    }
    return lane_max(mx);
}

// attention_values on the word path: unit i in group i % kGroups, each group's sums of the words'
// even and odd elements over the unit's vectors (a pair's vector F weighs the first key's words
// by its p and the second's by its own), then the groups and the keys of a pair added, elements
// interleaved back in order. A pair's second key past the last reads tail's zeros with p 0 (the
// scores are -inf up to n rounded up to W).
template <int F, bool Half>
void word_values(const float* p, const uint16_t* V, int64_t n, float inv, const uint16_t* tail, float* out) {
    using L = Words<F, Half>;
    constexpr int NV = L::NV;
    vf e[kGroups][NV], o[kGroups][NV];
    for (int g = 0; g < kGroups; g++)
        for (int c = 0; c < NV; c++) e[g][c] = o[g][c] = splat(0.f);
    const vi first = lane_index() < W / 2;
    const auto add = [&](int g, const float* pj, const uint16_t* v) {
        const vf a = splat(pj[0]), b = L::U == 2 ? splat(pj[1]) : a;
        for (int c = 0; c < NV; c++) {
            const vf x = !Half || c < F ? a : c > F ? b : select(first, a, b);
            const vw w = load_words(v + 2 * c * W);
            e[g][c] += x * first_of(w);
            o[g][c] += x * second_of(w);
        }
    };
    const int64_t units = n / L::U;
    int64_t i = 0;
    for (; i + kGroups <= units; i += kGroups)
        for (int g = 0; g < kGroups; g++) add(g, p + (i + g) * L::U, V + (i + g) * L::U * L::D);
    for (; i < units; i++) add(0, p + i * L::U, V + i * L::U * L::D);
    if (n % L::U) add(0, p + i * L::U, tail);
    for (int g = 1; g < kGroups; g++)
        for (int c = 0; c < NV; c++) e[0][c] += e[g][c], o[0][c] += o[g][c];
    const vf s = splat(inv);
    if constexpr (!Half) {
        for (int c = 0; c < NV; c++) {
            store(out + 2 * c * W, zip_lo(e[0][c], o[0][c]) * s);
            store(out + 2 * c * W + W, zip_hi(e[0][c], o[0][c]) * s);
        }
    } else {  // the pair's elements in order, then each element of the first key's plus the second's
        float pair[2 * L::D];
        for (int c = 0; c < NV; c++) {
            store(pair + 2 * c * W, zip_lo(e[0][c], o[0][c]));
            store(pair + 2 * c * W + W, zip_hi(e[0][c], o[0][c]));
        }
        for (int64_t d = 0; d < L::D; d += W) store(out + d, (load(pair + d) + load(pair + L::D + d)) * s);
    }
}

// The softmax of n scores (max: their maximum) in place, unnormalised: returns 1 / their sum.
inline float softmax(float* scores, int64_t n, float max) {
    vf total = splat(0.f);
    for (int64_t j = 0; j < n; j += W) {
        const vf e = vexp(load(scores + j) - splat(max));
        store(scores + j, e);
        total += e;
    }
    return 1.f / lane_sum(total);
}

// The attention of rep query heads (at q, D apart) over n keys and values, out likewise: each
// head's scores, softmax and values' sum, by the general code ...
template <typename T>
void attend(const float* q, int64_t rep, const T* K, const T* V, int64_t n, int64_t D, float* scores, float* out) {
    const float scale = 1.f / std::sqrt((float)D);
    for (int64_t r = 0; r < rep; r++) {
        const float m = attention_scores(q + r * D, K, r == 0 ? V : nullptr, n, D, scale, scores);
        const float inv = softmax(scores, n, m);
        attention_values(scores, V, n, D, inv, out + r * D);
    }
}

// ... or the word path (tail: see word_scores).
template <int F, bool Half>
void word_attend(const float* q, int64_t rep, const uint16_t* K, const uint16_t* V, int64_t n, float* scores, float* out) {
    constexpr int64_t D = Words<F, Half>::D;
    const float scale = 1.f / std::sqrt((float)D);
    uint16_t tail[2 * D] = {};
    std::memcpy(tail, K + (n - 1) * D, sizeof(uint16_t) * D);
    uint16_t vtail[2 * D] = {};
    if (Half && n % 2) std::memcpy(vtail, V + (n - 1) * D, sizeof(uint16_t) * D);
    for (int64_t r = 0; r < rep; r++) {
        const float m = word_scores<F, Half>(q + r * D, K, r == 0 ? V : nullptr, n, scale, tail, scores);
        const float inv = softmax(scores, n, m);
        word_values<F, Half>(scores, V, n, inv, vtail, out + r * D);
    }
}

// A bf16 cache takes the word path where D is a multiple of W and q's vectors fit in registers
// (Words: up to 9 vectors of words per unit), else the general code.
void attend(const float* q, int64_t rep, const uint16_t* K, const uint16_t* V, int64_t n, int64_t D, float* scores,
            float* out) {
    switch (D % W ? 0 : D / W) {
        case 1: return word_attend<0, true>(q, rep, K, V, n, scores, out);
        case 2: return word_attend<1, false>(q, rep, K, V, n, scores, out);
        case 3: return word_attend<1, true>(q, rep, K, V, n, scores, out);
        case 4: return word_attend<2, false>(q, rep, K, V, n, scores, out);
        case 5: return word_attend<2, true>(q, rep, K, V, n, scores, out);
        case 6: return word_attend<3, false>(q, rep, K, V, n, scores, out);
        case 7: return word_attend<3, true>(q, rep, K, V, n, scores, out);
        case 8: return word_attend<4, false>(q, rep, K, V, n, scores, out);
        case 9: return word_attend<4, true>(q, rep, K, V, n, scores, out);
        default: return attend<uint16_t>(q, rep, K, V, n, D, scores, out);
    }
}

// One (row, kv head) in slot S = slot_of(b): rotate its keys and queries, store the key and value
// in slot S (as T) if `store`, attend over slots start .. S if `look`. A step where rows have
// several queries (extras) runs every store first and then every attention (two passes of the
// pool), so a query sees the keys its row's earlier queries store in the same step.
template <typename T>
void attention_task_t(Step& s, int64_t task, bool store, bool look) {
    const int64_t H = s.cfg[kHeads], KV = s.cfg[kKV], D = s.cfg[kHeadDim], rep = H / KV;
    const int64_t b = task / KV, g = task % KV, S = slot_of(s, b);
    const int64_t lo = std::min(s.start[b], S), pos = std::max<int64_t>(S - s.start[b], 0);
    float* row = s.qkv + b * (H + 2 * KV) * D;
    float* k = row + (H + g) * D;
    const float* v = row + (H + KV + g) * D;
    const int64_t base = (((s.layer * s.kv_rows + cache_row(s, b)) * KV + g) * s.max_len) * D;
    T *K = (T*)s.kc + base, *V = (T*)s.vc + base;
    const int64_t n = S + 1 - lo;
    if (store) {
        if (s.cfg[kRope]) {
            const int64_t half = D / 2;
            const float *c = s.w[kCos] + pos * half, *sn = s.w[kSin] + pos * half;
            rotate(k, c, sn, half);
            for (int64_t q = g * rep; q < (g + 1) * rep; q++) rotate(row + q * D, c, sn, half);
        }
        put_row(K + S * D, k, D);
        put_row(V + S * D, v, D);
    }
    if (!look) return;
    prefetch(K + lo * D, std::min<int64_t>(n, kAhead * W) * D);  // after q, k and v are read: their lines first
    float* scores = scratch((n + W - 1) / W * W);
    attend(row + g * rep * D, rep, K + lo * D, V + lo * D, n, D, scores, s.att + b * H * D + g * rep * D);
}

template <bool Store, bool Look>
void attention_task(void* p, int64_t task) {
    Step& s = *(Step*)p;
    if (s.cfg[kKVType] == kKVBF16) attention_task_t<uint16_t>(s, task, Store, Look);
    else attention_task_t<float>(s, task, Store, Look);
}

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: its detached workers outlive static destructors
    return *p;
}

std::mutex step_mutex;  // one step at a time (ctypes releases the GIL)
std::vector<float> workspace;
std::vector<char> xq_buffer;
std::vector<int64_t> head_rows;  // the rows whose logits a step computes
std::vector<int64_t> run_rows, run_ids, run_start, run_slot;  // the queries a step runs (skip, extra)
std::vector<uint8_t> run_need;

// Sets up the products of weight i (index into w) on the B rows of X: its format, and X rounded to
// int8 blocks (once per product) when the weight is int8/int4.
std::vector<uint32_t> xb_buffer;

void prepare(Step& s, int64_t i, const float* X, int64_t in) {
    s.wfmt = fmt_of(s, i);
    s.xb = nullptr;
    if (!s.wfmt && s.cfg[kFormat] == kBF16Dot) {  // X as bf16 pairs, a zero after an odd row
        const int64_t in2 = even(in) / 2;
        xb_buffer.resize(s.B * in2);
        for (int64_t b = 0; b < s.B; b++) {
            uint16_t* row = (uint16_t*)(xb_buffer.data() + b * in2);
            to_bf16_n(X + b * in, in, row);
            if (in % 2) row[in] = 0;
        }
        s.xb = xb_buffer.data();
    }
    if (!s.wfmt) return;
    xq_buffer.resize(slmq::xq_bytes(s.B, in));
    s.xq = xq_buffer.data();
    slmq::quantize_rows(X, in, in, s.B, s.xq);
}

// Y[b] (+)= W X[b] + bias for the B rows, W = weight i: the one entry point of the products,
// whatever the weight's format (the model's float panels, s.matvec, or its int8/int4 blocks).
// yrow: null, or the row of Y each row of X writes.
void product(Step& s, int64_t i, const float* bias, const float* X, int64_t in, int64_t out,
             float* Y, int64_t ldy, bool add, const int64_t* yrow = nullptr) {
    prepare(s, i, X, in);
    s.W = s.w[i], s.bias = bias, s.X = X, s.in = in, s.out = out, s.ldx = in, s.Y = Y, s.ldy = ldy, s.yrow = yrow,
        s.add = add;
    s.rows = task_panels(panels(out), s.threads) * kPanel;
    pool().run(s.threads, (out + s.rows - 1) / s.rows, product_task, &s);
}

}  // namespace

// Runs fn(ctx, t) for t in [0, n) on up to `threads` threads of the steps' pool, for callers
// outside a step (sample.cpp's rows); one at a time with the steps, which share the pool.
void slm_pool_for(int threads, int64_t n, void (*fn)(void*, int64_t), void* ctx) {
    std::lock_guard<std::mutex> lock(step_mutex);
    pool().run(std::max(threads, 1), n, fn, ctx);
}

extern "C" {

// The best instruction set for the products on this CPU: 1 scalar, 2 AVX2, 3 AVX-512.
int slm_decode_isa() { return best_isa(); }

// 1 when this CPU runs the kBF16Dot products (AVX512-BF16), else 0.
int slm_decode_has_bf16_dot() {
#if defined(SLM_X86)
    return has_bf16_dot() && best_isa() == kAvx512;
#else
    return 0;
#endif
}

// Bytes of a (rows x in) float32 matrix packed in a weight format (0 float32, 1 bf16, 2 bf16 pairs
// for vdpbf16ps); -1 for an unknown format.
int64_t slm_decode_packed_bytes(int64_t format, int64_t rows, int64_t in) {
    return known_format(format) ? packed_bytes(format, rows, in) : -1;
}

// Packs src (rows x in, float32, row-major) into dst (slm_decode_packed_bytes of it). Returns 0,
// or 2 for an unknown format.
int slm_decode_pack(const float* src, int64_t rows, int64_t in, int64_t format, void* dst) {
    if (format == kF32) pack_panels(src, rows, in, (float*)dst);
    else if (format == kBF16) pack_panels(src, rows, in, (uint16_t*)dst);
    else if (format == kBF16Dot) pack_pairs(src, rows, in, (uint16_t*)dst);
    else return 2;
    return 0;
}

// One token per row: ids (B,), start (B,) the first real slot of each row, S the slots filled so
// far; keys and values (n_layer, kv_rows, KV, max_len, D, rows 0 .. B-1 in use; float32 or bf16 as
// cfg[kKVType]) get slot S; logits (B, vocab). isa 0 picks the
// best. fmt: null, or one int64 per tensor of w: 0 for the model's float format (cfg[kFormat],
// packed by slm_decode_pack), else int8/int4 blocks (qdecode.h's kind | group << 8; tok_emb, the
// head and the matrices of the products). Returns 0, or 1 for a token id outside the vocabulary,
// 2 for an isa this CPU lacks, an unknown weight format or an unknown KV type. need: null, or one
// byte per row, 0 where nobody reads the row's logits (a riding prompt's row before its last
// token, a hole): its final norm and head product are skipped and its logits are zeros; the
// other rows' logits are the same bits either way. rest: the pool's workers sleep at once after
// this step instead of spinning (Pool::rest; the caller's own work before its next step is long).
// skip: null, or one byte per row, 1 for a row not run at all (a continuous batch's hole, whose
// sequence has left): its slot S is not written and its logits are zeros; the other rows run as a
// batch of their own, with the same bits as in a step of every row.
// extra: null, or one count per row, n_b tokens (read in order from extra_ids) that row b feeds
// before its own token, into slots S - n_b .. S - 1 (a prompt joining a batch: its tokens in one
// step rather than one a step). They run as rows of the step of their own (no logits) on the
// row's cache row, every key and value stored before any query attends, so each token's keys,
// values and the row's logits are the same bits as when the tokens come one a step (a skipped
// row's extras are not run). Returns 3 when an extra's slot would be before slot 0 or its row's
// first real slot.
int slm_decode_step(const int64_t* cfg, const float* const* w, float eps, const int64_t* ids, const int64_t* start,
                    int64_t B, int64_t S, int64_t max_len, int64_t kv_rows, void* kc, void* vc, float* logits,
                    int threads, int isa,
                    const int64_t* fmt, const uint8_t* need, int rest, const uint8_t* skip,
                    const int64_t* extra, const int64_t* extra_ids) {
    const int best = best_isa();
    if (isa == kAuto) isa = best;
    if (isa > best || isa < kScalar || !known_format(cfg[kFormat]) || !matvec_for(isa, cfg[kFormat])) return 2;
    if (cfg[kKVType] != kKVF32 && cfg[kKVType] != kKVBF16) return 2;
    if (kv_rows < B) return 2;
    if (fmt)
        for (int64_t i = 0; i < kGlobal + cfg[kLayers] * kPerLayer; i++)
            if (fmt[i] && !slmq::quantized(fmt[i])) return 2;
    const int64_t V = cfg[kVocab], C = cfg[kEmbd], H = cfg[kHeads], KV = cfg[kKV], D = cfg[kHeadDim];
    const int64_t hidden = cfg[kHidden];
    int64_t extras = 0;
    for (int64_t b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= V) return 1;
        if (extra) {  // (a skipped row's extras are read past, not run)
            if (extra[b] < 0 || extra[b] > S || (extra[b] && S - extra[b] < start[b])) return 3;
            for (int64_t j = extras; j < extras + extra[b]; j++)
                if (extra_ids[j] < 0 || extra_ids[j] >= V) return 1;
            extras += extra[b];
        }
    }
    std::lock_guard<std::mutex> lock(step_mutex);
    const int64_t* rows = nullptr;  // the cache row of each row run (null: row b)
    const int64_t* slot = nullptr;  // the slot each row run writes (null: S)
    if (skip || extras) {  // the rows run, packed: their cache rows, ids, starts, needs and slots
        run_rows.clear(), run_ids.clear(), run_start.clear(), run_need.clear(), run_slot.clear();
        const int64_t* next = extra_ids;
        for (int64_t b = 0; b < B; b++) {
            const int64_t n = extras ? extra[b] : 0;
            if (skip && skip[b]) {
                std::fill(logits + b * V, logits + (b + 1) * V, 0.f);
                next += n;
                continue;
            }
            for (int64_t j = 0; j < n; j++) {
                run_rows.push_back(b), run_ids.push_back(*next++), run_start.push_back(start[b]);
                run_need.push_back(0), run_slot.push_back(S - n + j);
            }
            run_rows.push_back(b), run_ids.push_back(ids[b]), run_start.push_back(start[b]);
            run_need.push_back(need ? need[b] : 1), run_slot.push_back(S);
        }
        B = (int64_t)run_rows.size(), rows = run_rows.data(), ids = run_ids.data(), start = run_start.data();
        if (need || extras) need = run_need.data();
        if (extras) slot = run_slot.data();
    }
    const int64_t qkv_width = (H + 2 * KV) * D;
    workspace.resize(B * (3 * C + qkv_width + hidden));
    Step s{cfg, w, eps, start, B, S, max_len, kc, vc, std::max(threads, 1), matvec_for(isa, cfg[kFormat])};
    s.fmt = fmt, s.isa = isa, s.kv_rows = kv_rows, s.kv_row = rows, s.slot = slot;
    s.x = workspace.data(), s.h = s.x + B * C, s.att = s.h + B * C, s.qkv = s.att + B * C, s.act = s.qkv + B * qkv_width;
    s.logits = logits;
    const bool ln = cfg[kLayerNorm];
    for (int64_t b = 0; b < B; b++) {
        const float* e = w[kTokEmb] + ids[b] * C;
        if (fmt_of(s, kTokEmb)) slmq::dequantize_row(fmt[kTokEmb], w[kTokEmb], C, ids[b], s.h), e = s.h;
        const int64_t pos = std::max<int64_t>(slot_of(s, b) - start[b], 0);
        for (int64_t i = 0; i < C; i++) s.x[b * C + i] = e[i] + (w[kPosEmb] ? w[kPosEmb][pos * C + i] : 0.f);
    }
    for (int64_t l = 0; l < cfg[kLayers]; l++) {
        const float* const* lw = w + kGlobal + l * kPerLayer;
        s.layer = l;
        for (int64_t b = 0; b < B; b++) norm(s.x + b * C, lw[kN1w], lw[kN1b], C, eps, ln, s.h + b * C);
        const int64_t li = kGlobal + l * kPerLayer;
        product(s, li + kQkvW, lw[kQkvB], s.h, C, qkv_width, s.qkv, qkv_width, false);
        if (slot) {  // rows with several queries: every key and value stored before any query attends
            pool().run(s.threads, B * KV, attention_task<true, false>, &s);
            pool().run(s.threads, B * KV, attention_task<false, true>, &s);
        } else {
            pool().run(s.threads, B * KV, attention_task<true, true>, &s);
        }
        product(s, li + kProjW, lw[kProjB], s.att, C, C, s.x, C, true);
        for (int64_t b = 0; b < B; b++) norm(s.x + b * C, lw[kN2w], lw[kN2b], C, eps, ln, s.h + b * C);
        prepare(s, li + kUpW, s.h, C);
        s.rows = task_panels(panels(hidden), s.threads) * kPanel;
        pool().run(s.threads, (hidden + s.rows - 1) / s.rows, up_task, &s);
        product(s, li + kDownW, lw[kDownB], s.act, hidden, C, s.x, C, true);
    }
    // The head reads the needed rows' normed states packed together and writes each to its own
    // row of logits (a row's products do not depend on the batch it is in, so its bits are the same).
    head_rows.clear();
    for (int64_t b = 0; b < B; b++) {
        const int64_t out = cache_row(s, b);
        if (slot_of(s, b) != S) continue;  // an extra token: its row's own token writes the row's logits
        if (need && !need[b]) {
            std::fill(logits + out * V, logits + (out + 1) * V, 0.f);
            continue;
        }
        norm(s.x + b * C, w[kNormW], w[kNormB], C, eps, ln, s.h + (int64_t)head_rows.size() * C);
        head_rows.push_back(out);
    }
    if (!head_rows.empty()) {
        s.B = (int64_t)head_rows.size();
        product(s, kHeadW, w[kHeadB], s.h, C, V, logits, V, false, head_rows.data());
    }
    if (rest) pool().rest();
    return 0;
}

}  // extern "C"
