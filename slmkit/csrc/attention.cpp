// Causal self-attention on the CPU, forward and backward, for training in float32.
//
// Why this exists: PyTorch's CPU flash-attention computes scores a tile at a time with
// matrix-multiply calls whose inner dimension is the head size D. At small head sizes (8 in
// stories260k) those calls are mostly overhead, tiles above the diagonal are computed and masked,
// and at D = 48 (stories15m) the calls still run far from the machine's multiply-add peak. Two
// designs, by head size (the dispatch is at the bottom of the file):
//
// W below is the floats per vector: 16 in the AVX-512 build, 8 in the AVX2 one (vec.h).
// D <= 16 and odd sizes (forward, backward): a vector holds W query rows or W keys side by side,
//   so every step is the same few vector instructions whatever D is, and nothing is computed
//   above the diagonal.
//   forward, lanes = W query rows: for each key j <= the last row, s = q . k_j (D fused
//     multiply-adds with k_j[d] broadcast), then softmax over the keys and o += p v_j.
//   backward, lanes = W keys: for each query row i that sees them, rebuild p from the saved
//     log-sum-exp, dp = dout_i . v, ds = p (dp - delta_i), accumulate dk += ds q_i, dv += p dout_i,
//     keep ds; then per row, dq = sum over key blocks of ds k, one transposing sum at the end.
// D = 32, 48, 64 (forward_tiled, backward_tiled): small matrix multiplies on tiles of rows x W
//   keys with register-blocked accumulators, like a GEMM micro-kernel (the blocking per build:
//   AVX-512 has 32 vector registers, AVX2 16).
// Each (batch, head) or (batch, kv-head) is one task; grouped-query attention reads its shared
// keys and values directly (no repeat_interleave).
//
// Built by slmkit/cpu_kernels.py with the machine's C++ compiler (-O3 -fopenmp, once per
// instruction-set level: -march=native with AVX-512, -march=x86-64-v3 for AVX2), loaded with
// ctypes. The vectors are GCC/Clang vector extensions (vec.h), so the same source compiles to
// AVX-512, AVX2 or NEON. The loops are instantiated for common head sizes so that
// D-long arrays of vectors live in registers. Layouts (element strides are passed for q, k, v;
// the last dim is dense):
//   q (B, H, T, D), k and v (B, KV, T, D); out and dout (B, T, H, D) dense; lse (B, H, T) dense;
//   dq (B, H, T, D) dense; dk and dv (B, KV, T, D) dense.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "vec.h"

namespace {

struct Shape {
    int64_t B, H, KV, T, D;
    int64_t qs[3], ks[3], vs[3];  // strides of q, k, v in batch, head and time, in elements
    Shape(const int64_t* dims, const int64_t* st)
        : B(dims[0]), H(dims[1]), KV(dims[2]), T(dims[3]), D(dims[4]),
          qs{st[0], st[1], st[2]}, ks{st[3], st[4], st[5]}, vs{st[6], st[7], st[8]} {}
};

float* alloc(int64_t floats) {
    return (float*)std::aligned_alloc(64, (size_t)((floats + W - 1) / W * W) * sizeof(float));
}

// W rows of x (row stride `st`, rows from `row0`, zeros past T), times `scale`, as D vectors:
// out[d][lane] = x[row0 + lane][d].
template <int DC>
inline void rows_to_lanes(vf* out, const float* x, int64_t st, int64_t row0, int64_t T, int64_t D, float scale) {
    for (int64_t d = 0; d < (DC ? DC : D); d++) out[d] = splat(0.f);
    for (int64_t r = 0; r < W && row0 + r < T; r++)
        for (int64_t d = 0; d < (DC ? DC : D); d++) out[d][r] = x[(row0 + r) * st + d] * scale;
}

// The T rows of x (row stride `st`) transposed into (D, Tp), zeros past T.
inline void transpose_rows(float* out, const float* x, int64_t st, int64_t T, int64_t D, int64_t Tp) {
    std::memset(out, 0, (size_t)(D * Tp) * sizeof(float));
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d++) out[d * Tp + t] = x[t * st + d];
}

// ------------------------------------------------------------------------------------ forward
template <int DC>
void forward(const float* q, const float* k, const float* v, float* out, float* lse, const Shape& s,
             float scale, int threads) {
    const int64_t D = DC ? DC : s.D, T = s.T, rep = s.H / s.KV, blocks = (T + W - 1) / W;
#pragma omp parallel num_threads(threads)
    {
        // With D known at compile time these arrays are locals the compiler keeps in registers.
        vf qt_fixed[DC ? DC : 1], o_fixed[DC ? DC : 1];
        vf* qt = DC ? qt_fixed : (vf*)alloc(D * W);
        vf* o = DC ? o_fixed : (vf*)alloc(D * W);
        vf* sc = (vf*)alloc(T * W);  // the block's scores, one vector (W rows) per key
        const vi lanes = lane_index();
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < s.B * s.H; task++) {
            const int64_t b = task / s.H, h = task % s.H, g = h / rep;
            const float* kb = k + b * s.ks[0] + g * s.ks[1];
            const float* vb = v + b * s.vs[0] + g * s.vs[1];
            for (int64_t blk = 0; blk < blocks; blk++) {
                const int64_t i0 = blk * W, keys = std::min(i0 + W, T);
                rows_to_lanes<DC>(qt, q + b * s.qs[0] + h * s.qs[1], s.qs[2], i0, T, D, scale);
                auto score = [&](int64_t j) {
                    const float* kj = kb + j * s.ks[2];
                    vf x = splat(0.f), y = splat(0.f);  // two partial sums: half the dependency chain
                    for (int64_t d = 0; d + 1 < D; d += 2) {
                        x += qt[d] * splat(kj[d]);
                        y += qt[d + 1] * splat(kj[d + 1]);
                    }
                    if (D % 2) x += qt[D - 1] * splat(kj[D - 1]);
                    x += y;
                    if (j > i0) x = select(lanes >= (int32_t)(j - i0), x, splat(-INFINITY));
                    sc[j] = x;
                    return x;
                };
                // Running maxima and sums of even and odd keys apart: each is a chain through the
                // loop, and two chains run at twice the speed of one.
                vf m = splat(-INFINITY), m2 = m;
                int64_t j = 0;
                for (; j + 1 < keys; j += 2) {
                    m = vmax(m, score(j));
                    m2 = vmax(m2, score(j + 1));
                }
                if (j < keys) m = vmax(m, score(j));
                m = vmax(m, m2);
                vf l = splat(0.f), l2 = l;
                for (int64_t d = 0; d < D; d++) o[d] = splat(0.f);
                // The exponentials in a loop of their own, so the core overlaps their long chains.
                for (j = 0; j + 1 < keys; j += 2) {
                    sc[j] = vexp(sc[j] - m);
                    sc[j + 1] = vexp(sc[j + 1] - m);
                    l += sc[j];
                    l2 += sc[j + 1];
                }
                if (j < keys) {
                    sc[j] = vexp(sc[j] - m);
                    l += sc[j];
                }
                l += l2;
                for (int64_t j = 0; j < keys; j++) {
                    const float* vj = vb + j * s.vs[2];
                    for (int64_t d = 0; d < D; d++) o[d] += sc[j] * splat(vj[d]);
                }
                for (int64_t r = 0; r < W && i0 + r < T; r++) {
                    float* orow = out + ((b * T + i0 + r) * s.H + h) * D;
                    for (int64_t d = 0; d < D; d++) orow[d] = o[d][r] / l[r];
                    lse[(b * s.H + h) * T + i0 + r] = m[r] + std::log(l[r]);
                }
            }
        }
        if (!DC) { std::free(qt); std::free(o); }
        std::free(sc);
    }
}


// ------------------------------------------------------------------------- forward, tiled
// For head sizes that are multiples of W (32, 48, 64): R query rows against W keys at a time,
// like a matrix-multiply micro-kernel. Scores: for each d, one load of W keys' d-th component,
// R fused multiply-adds against broadcast q[r][d]. Output: for each key, one load of v_j (DV
// vectors), R x CC multiply-adds against broadcast p[r][j], CC of the DV vectors at a time (all of
// them in AVX-512's 32 registers; AVX2's 16 hold fewer accumulators). The softmax takes two passes
// over the R rows' stored scores (maxima, then exponentials): rescaling an online softmax block by
// block cost as much scalar work as the multiplies.
template <int DV, int R, int CC>
void forward_tiled(const float* q, const float* k, const float* v, float* out, float* lse, const Shape& s,
                   float scale, int threads) {
    constexpr int64_t D = DV * W;
    const int64_t T = s.T, rep = s.H / s.KV, Tp = (T + W - 1) / W * W;
#pragma omp parallel num_threads(threads)
    {
        float* kt = alloc(D * Tp);  // keys transposed, (D, Tp)
        float* sp = alloc(R * Tp);  // the R rows' scores, then probabilities
        const vi lanes = lane_index();
        int64_t loaded = -1;
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < s.B * s.H; task++) {
            const int64_t b = task / s.H, h = task % s.H, g = h / rep;
            const float* kb = k + b * s.ks[0] + g * s.ks[1];
            const float* vb = v + b * s.vs[0] + g * s.vs[1];
            if (loaded != b * s.KV + g) {  // consecutive tasks often share the kv head
                loaded = b * s.KV + g;
                transpose_rows(kt, kb, s.ks[2], T, D, Tp);
            }
            const float* qh = q + b * s.qs[0] + h * s.qs[1];
            for (int64_t i0 = 0; i0 < T; i0 += R) {
                const float* qr[R];
                for (int r = 0; r < R; r++) qr[r] = qh + std::min(i0 + r, T - 1) * s.qs[2];
                const int64_t last = std::min(i0 + R - 1, T - 1);  // the block's last row sees keys 0..last
                vf mx[R];
                for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
                // Scores into sp, two blocks of W keys at a time where there are two: each broadcast
                // q[r][d] then feeds two multiply-adds (loads, not arithmetic, bound one block alone).
                auto finish = [&](vf* sc, int64_t j0) {
                    for (int r = 0; r < R; r++) {
                        sc[r] *= splat(scale);
                        if (j0 + W - 1 > i0 + r)  // keys past this row, or past T
                            sc[r] = select(lanes <= (int32_t)(std::min(i0 + r, T - 1) - j0), sc[r], splat(-INFINITY));
                        store(sp + r * Tp + j0, sc[r]);
                        mx[r] = vmax(mx[r], sc[r]);
                    }
                };
                int64_t j0 = 0;
                for (; j0 + W <= last; j0 += 2 * W) {
                    vf sa[R], sb[R];
                    for (int r = 0; r < R; r++) sa[r] = sb[r] = splat(0.f);
                    for (int64_t d = 0; d < D; d++) {
                        const vf ka = load(kt + d * Tp + j0), kb2 = load(kt + d * Tp + j0 + W);
                        for (int r = 0; r < R; r++) {
                            const vf qd = splat(qr[r][d]);
                            sa[r] += ka * qd;
                            sb[r] += kb2 * qd;
                        }
                    }
                    finish(sa, j0);
                    finish(sb, j0 + W);
                }
                if (j0 <= last) {
                    vf sc[R];
                    for (int r = 0; r < R; r++) sc[r] = splat(0.f);
                    for (int64_t d = 0; d < D; d++) {
                        const vf kd = load(kt + d * Tp + j0);
                        for (int r = 0; r < R; r++) sc[r] += kd * splat(qr[r][d]);
                    }
                    finish(sc, j0);
                }
                float m[R], l[R];
                vf lsum[R];
                for (int r = 0; r < R; r++) {
                    m[r] = hmax(mx[r]);
                    lsum[r] = splat(0.f);
                }
                for (int64_t j0 = 0; j0 <= last; j0 += W)  // probabilities (unnormalised), in place
                    for (int r = 0; r < R; r++) {
                        const vf p = vexp(load(sp + r * Tp + j0) - splat(m[r]));
                        store(sp + r * Tp + j0, p);
                        lsum[r] += p;
                    }
                for (int r = 0; r < R; r++) l[r] = hsum(lsum[r]);
                static_assert(DV % CC == 0, "column chunks must tile the head");
                for (int c0 = 0; c0 < DV; c0 += CC) {
                    vf o[R][CC];
                    for (int r = 0; r < R; r++)
                        for (int c = 0; c < CC; c++) o[r][c] = splat(0.f);
                    for (int64_t j = 0; j <= last; j++) {  // o += p_j v_j
                        const float* vj = vb + j * s.vs[2] + c0 * W;
                        vf vv[CC];
                        for (int c = 0; c < CC; c++) vv[c] = load(vj + c * W);
                        for (int r = 0; r < R; r++)
                            for (int c = 0; c < CC; c++) o[r][c] += splat(sp[r * Tp + j]) * vv[c];
                    }
                    for (int r = 0; r < R && i0 + r < T; r++) {
                        float* orow = out + ((b * T + i0 + r) * s.H + h) * D + c0 * W;
                        for (int c = 0; c < CC; c++) store(orow + c * W, o[r][c] * splat(1.f / l[r]));
                    }
                }
                for (int r = 0; r < R && i0 + r < T; r++) lse[(b * s.H + h) * T + i0 + r] = m[r] + std::log(l[r]);
            }
        }
        std::free(sp);
        std::free(kt);
    }
}


// ----------------------------------------------------------------------------------- backward
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

// One step of summing W vectors across their lanes at once: each 2H-lane block of the result
// holds the H-lane half sums of a's block, then of b's.
template <int H>
inline vf fold(vf a, vf b) {
#if defined(__AVX512F__)  // W = 16
    if constexpr (H == 8) return SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) + SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    else if constexpr (H == 4) return SHUFFLE(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) + SHUFFLE(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    else if constexpr (H == 2) return SHUFFLE(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) + SHUFFLE(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    else if constexpr (H == 1) return SHUFFLE(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) + SHUFFLE(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
#else  // W = 8
    if constexpr (H == 4) return SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
    else if constexpr (H == 2) return SHUFFLE(a, b, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    else if constexpr (H == 1) return SHUFFLE(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
#endif
}

// sums[n] = the sum of v[n]'s lanes, for n < count <= W: log2(W) rounds of fold (W - 1 of them
// for W vectors, instead of W chains of W - 1 dependent adds). The last round leaves vector n's
// sum in lane bitreverse(n) (of log2(W) bits).
inline void lane_sums(const vf* v, int count, float* sums) {
    vf x[W];
    for (int n = 0; n < W; n++) x[n] = n < count ? v[n] : splat(0.f);
#if defined(__AVX512F__)  // W = 16
    for (int n = 0; n < 8; n++) x[n] = fold<8>(x[2 * n], x[2 * n + 1]);
#endif
    for (int n = 0; n < 4; n++) x[n] = fold<4>(x[2 * n], x[2 * n + 1]);
    for (int n = 0; n < 2; n++) x[n] = fold<2>(x[2 * n], x[2 * n + 1]);
    const vf r = fold<1>(x[0], x[1]);
    for (int n = 0; n < count; n++) {
        int lane = 0;  // n's bits reversed
        for (int bit = 1, to = W / 2; bit < W; bit <<= 1, to >>= 1)
            if (n & bit) lane |= to;
        sums[n] = r[lane];
    }
}

// Row 0 sees key 0 alone: its softmax is exactly 1, so ds = p (dp - delta) is exactly 0 and dv_0
// gets dout_0 exactly. The rebuilt p and delta carry rounding (the scores are summed in another
// order than in the forward), which would leave noise where the gradient is exactly zero.
inline void first_row(vf& p, vf& ds, const vi& lanes) {
    p = select(lanes == 0, splat(1.f), splat(0.f));
    ds = splat(0.f);
}

// Per (batch, kv-head) task, for each of the group's query heads:
//   pass 1, lanes = W keys (a block): for each row i >= the block's first key, rebuild p,
//     ds = p (dout_i . v - delta_i), add ds q_i to dk and p dout_i to dv (registers), and keep ds;
//   pass 2, per row: dq_i = sum over blocks of the kept ds times the block's keys, one horizontal
//     sum per (row, d) at the end instead of recomputing the softmax in the other orientation.
template <int DC>
void backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
              const float* lse, float* dq, float* dk, float* dv, const Shape& s, float scale, int threads) {
    const int64_t D = DC ? DC : s.D, T = s.T, rep = s.H / s.KV, blocks = (T + W - 1) / W;
    const int64_t Tp = blocks * W;
#pragma omp parallel num_threads(threads)
    {
        vf kb_fixed[DC ? DC : 1], vb_fixed[DC ? DC : 1], gk_fixed[DC ? DC : 1], gv_fixed[DC ? DC : 1];
        vf* kl = DC ? kb_fixed : (vf*)alloc(D * W);  // the block's keys, lanes = W keys
        vf* vl = DC ? vb_fixed : (vf*)alloc(D * W);  // and values
        vf* gk = DC ? gk_fixed : (vf*)alloc(D * W);  // their dk
        vf* gv = DC ? gv_fixed : (vf*)alloc(D * W);  // and dv
        float* kt = alloc(D * Tp);                   // keys transposed (D, Tp), for pass 2
        float* dkt = alloc(D * Tp);                  // dk and dv transposed, summed over heads
        float* dvt = alloc(D * Tp);
        float* delta = alloc(T);
        float* ds_kept = alloc(Tp * Tp / 2 + Tp * W);  // ds of block b, row i at offset[b] + (i - W b) W
        int64_t* offset = new int64_t[blocks + 1];
        offset[0] = 0;
        for (int64_t b = 0; b < blocks; b++) offset[b + 1] = offset[b] + (T - b * W) * W;
        const vi lanes = lane_index();
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < s.B * s.KV; task++) {
            const int64_t b = task / s.KV, g = task % s.KV;
            const float* kb = k + b * s.ks[0] + g * s.ks[1];
            const float* vb = v + b * s.vs[0] + g * s.vs[1];
            transpose_rows(kt, kb, s.ks[2], T, D, Tp);
            std::memset(dkt, 0, (size_t)(D * Tp) * sizeof(float));
            std::memset(dvt, 0, (size_t)(D * Tp) * sizeof(float));
            for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                const float* qh = q + b * s.qs[0] + h * s.qs[1];
                const float* lh = lse + (b * s.H + h) * T;
                for (int64_t i = 0; i < T; i++) {  // delta_i = sum_j p_ij dp_ij = dout_i . out_i
                    const int64_t at = ((b * T + i) * s.H + h) * D;
                    float acc = 0.f;
                    for (int64_t d = 0; d < D; d++) acc += dout[at + d] * out[at + d];
                    delta[i] = acc;
                }
                for (int64_t blk = 0; blk < blocks; blk++) {  // pass 1
                    const int64_t j0 = blk * W;
                    rows_to_lanes<DC>(kl, kb, s.ks[2], j0, T, D, 1.f);
                    rows_to_lanes<DC>(vl, vb, s.vs[2], j0, T, D, 1.f);
                    for (int64_t d = 0; d < D; d++) {
                        gk[d] = load(dkt + d * Tp + j0);
                        gv[d] = load(dvt + d * Tp + j0);
                    }
                    float* kept = ds_kept + offset[blk];
                    // Rows go R at a time in three loops (scores, exponentials, accumulation): an
                    // exponential is a chain of some 15 dependent operations, and a loop of nothing
                    // else lets the core overlap R of them (2x faster than one loop per row).
                    constexpr int R = 8;
                    vf xs[R], dps[R];
                    for (int64_t i0 = j0; i0 < T; i0 += R) {
                        const int rows = (int)std::min<int64_t>(R, T - i0);
                        for (int r = 0; r < rows; r++) {
                            const float* qi = qh + (i0 + r) * s.qs[2];
                            const float* gi = dout + ((b * T + i0 + r) * s.H + h) * D;
                            vf x = splat(0.f), dp = splat(0.f), x2 = splat(0.f), dp2 = splat(0.f);
                            for (int64_t d = 0; d + 1 < D; d += 2) {
                                x += kl[d] * splat(qi[d]);
                                dp += vl[d] * splat(gi[d]);
                                x2 += kl[d + 1] * splat(qi[d + 1]);
                                dp2 += vl[d + 1] * splat(gi[d + 1]);
                            }
                            if (D % 2) { x += kl[D - 1] * splat(qi[D - 1]); dp += vl[D - 1] * splat(gi[D - 1]); }
                            xs[r] = (x + x2) * splat(scale) - splat(lh[i0 + r]);
                            dps[r] = dp + dp2 - splat(delta[i0 + r]);
                        }
                        for (int r = 0; r < rows; r++) xs[r] = vexp(xs[r]);
                        for (int r = 0; r < rows; r++) {
                            const int64_t i = i0 + r;
                            const float* qi = qh + i * s.qs[2];
                            const float* gi = dout + ((b * T + i) * s.H + h) * D;
                            vf p = xs[r], ds;
                            if (i < j0 + W - 1) p = select(lanes <= (int32_t)(i - j0), p, splat(0.f));
                            if (i == 0) first_row(p, ds, lanes);
                            else ds = p * dps[r] * splat(scale);
                            store(kept + (i - j0) * W, ds);
                            for (int64_t d = 0; d < D; d++) {
                                gk[d] += ds * splat(qi[d]);
                                gv[d] += p * splat(gi[d]);
                            }
                        }
                    }
                    for (int64_t d = 0; d < D; d++) {
                        store(dkt + d * Tp + j0, gk[d]);
                        store(dvt + d * Tp + j0, gv[d]);
                    }
                }
                for (int64_t i = 0; i < T; i++) {  // pass 2
                    for (int64_t d = 0; d < D; d++) gk[d] = splat(0.f);
                    for (int64_t blk = 0; blk <= i / W; blk++) {
                        const vf ds = load(ds_kept + offset[blk] + (i - blk * W) * W);
                        for (int64_t d = 0; d < D; d++) gk[d] += ds * load(kt + d * Tp + blk * W);
                    }
                    float* gq = dq + ((b * s.H + h) * T + i) * D;
                    for (int64_t d = 0; d < D; d += W) lane_sums(gk + d, (int)std::min<int64_t>(W, D - d), gq + d);
                }
            }
            float* gkb = dk + (b * s.KV + g) * T * D;
            float* gvb = dv + (b * s.KV + g) * T * D;
            for (int64_t t = 0; t < T; t++)
                for (int64_t d = 0; d < D; d++) {
                    gkb[t * D + d] = dkt[d * Tp + t];
                    gvb[t * D + d] = dvt[d * Tp + t];
                }
        }
        if (!DC) { std::free(kl); std::free(vl); std::free(gk); std::free(gv); }
        std::free(kt); std::free(dkt); std::free(dvt); std::free(ds_kept); std::free(delta);
        delete[] offset;
    }
}

// ------------------------------------------------------------------------ backward, tiled
// For head sizes that are multiples of W: W query rows x W keys at a time. Per tile, the five
// products of the backward pass are small matrix multiplies with register-blocked accumulators:
//   s = q k^T, dp = dout v^T (lanes = keys, W rows accumulated at once), then p, ds = p (dp - delta);
//   dv += p^T dout, dk += ds^T q (KS keys x DV vectors of accumulators, summed over the W rows);
//   dq += ds k (QR rows x DV vectors, summed over the W keys).
// dk and dv (per kv head) and dq (per head) live in scratch between tiles.
template <int DV, int KS, int QR>
void backward_tiled(const float* q, const float* k, const float* v, const float* out, const float* dout,
                    const float* lse, float* dq, float* dk, float* dv, const Shape& s, float scale, int threads) {
    constexpr int64_t D = DV * W;
    const int64_t T = s.T, rep = s.H / s.KV, blocks = (T + W - 1) / W, Tp = blocks * W;
#pragma omp parallel num_threads(threads)
    {
        float* kt = alloc(D * Tp);   // keys and values transposed (D, Tp)
        float* vt = alloc(D * Tp);
        float* gk = alloc(Tp * D);   // dk, dv (Tp, D), summed over the group's heads
        float* gv = alloc(Tp * D);
        float* gq = alloc(Tp * D);   // dq of the current head
        float* qs = alloc(Tp * D);   // the head's q rows, and dout rows, dense (Tp, D), zero past T
        float* go = alloc(Tp * D);
        float* delta = alloc(Tp);
        alignas(64) float pt[W][W], dst[W][W];  // p and ds of the tile, [row][key]
        const vi lanes = lane_index();
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < s.B * s.KV; task++) {
            const int64_t b = task / s.KV, g = task % s.KV;
            const float* kb = k + b * s.ks[0] + g * s.ks[1];
            const float* vb = v + b * s.vs[0] + g * s.vs[1];
            transpose_rows(kt, kb, s.ks[2], T, D, Tp);
            transpose_rows(vt, vb, s.vs[2], T, D, Tp);
            std::memset(gk, 0, (size_t)(Tp * D) * sizeof(float));
            std::memset(gv, 0, (size_t)(Tp * D) * sizeof(float));
            for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                const float* qh = q + b * s.qs[0] + h * s.qs[1];
                const float* lh = lse + (b * s.H + h) * T;
                std::memset(qs, 0, (size_t)(Tp * D) * sizeof(float));
                std::memset(go, 0, (size_t)(Tp * D) * sizeof(float));
                std::memset(gq, 0, (size_t)(Tp * D) * sizeof(float));
                for (int64_t i = 0; i < T; i++) {
                    const float* gi = dout + ((b * T + i) * s.H + h) * D;
                    const float* oi = out + ((b * T + i) * s.H + h) * D;
                    float acc = 0.f;
                    for (int64_t d = 0; d < D; d++) {
                        qs[i * D + d] = qh[i * s.qs[2] + d];
                        go[i * D + d] = gi[d];
                        acc += gi[d] * oi[d];
                    }
                    delta[i] = acc;
                }
                for (int64_t kb0 = 0; kb0 < blocks; kb0++) {
                    const int64_t j0 = kb0 * W;
                    for (int64_t i0 = j0 / W * W; i0 < T; i0 += W) {  // row blocks that see these keys
                        // s and dp, lanes = the W keys, one accumulator per row
                        vf sc[W], dp[W];
                        for (int r = 0; r < W; r++) sc[r] = splat(0.f);
                        for (int64_t d = 0; d < D; d++) {
                            const vf kd = load(kt + d * Tp + j0);
                            for (int r = 0; r < W; r++) sc[r] += kd * splat(qs[(i0 + r) * D + d]);
                        }
                        for (int r = 0; r < W; r++) dp[r] = splat(0.f);
                        for (int64_t d = 0; d < D; d++) {
                            const vf vd = load(vt + d * Tp + j0);
                            for (int r = 0; r < W; r++) dp[r] += vd * splat(go[(i0 + r) * D + d]);
                        }
                        for (int r = 0; r < W; r++) {
                            const int64_t i = std::min(i0 + r, T - 1);
                            sc[r] = sc[r] * splat(scale) - splat(lh[i]);
                        }
                        for (int r = 0; r < W; r++) sc[r] = vexp(sc[r]);
                        for (int r = 0; r < W; r++) {
                            vf p = sc[r], ds;
                            if (i0 + r >= T) p = splat(0.f);  // rows past T
                            else if (i0 + r < j0 + W - 1) p = select(lanes <= (int32_t)(i0 + r - j0), p, splat(0.f));
                            if (i0 + r == 0) first_row(p, ds, lanes);
                            else ds = p * (dp[r] - splat(delta[std::min(i0 + r, T - 1)])) * splat(scale);
                            store(pt[r], p);
                            store(dst[r], ds);
                        }
                        // dv += p^T dout and dk += ds^T q, KS keys at a time (KS x DV accumulators)
                        auto accumulate = [&](float (*coef)[W], const float* rows, float* acc) {
                            for (int j = 0; j < W; j += KS) {
                                vf a[KS][DV];
                                for (int jj = 0; jj < KS; jj++)
                                    for (int c = 0; c < DV; c++) a[jj][c] = load(acc + (j0 + j + jj) * D + c * W);
                                for (int r = 0; r < W; r++) {
                                    vf x[DV];
                                    for (int c = 0; c < DV; c++) x[c] = load(rows + (i0 + r) * D + c * W);
                                    for (int jj = 0; jj < KS; jj++) {
                                        const vf cc = splat(coef[r][j + jj]);
                                        for (int c = 0; c < DV; c++) a[jj][c] += cc * x[c];
                                    }
                                }
                                for (int jj = 0; jj < KS; jj++)
                                    for (int c = 0; c < DV; c++) store(acc + (j0 + j + jj) * D + c * W, a[jj][c]);
                            }
                        };
                        accumulate(pt, go, gv);
                        accumulate(dst, qs, gk);
                        // dq += ds k, QR rows at a time
                        static_assert(W % QR == 0, "row chunks must tile the block");
                        for (int r0 = 0; r0 < W; r0 += QR) {
                            vf aq[QR][DV];
                            for (int r = 0; r < QR; r++)
                                for (int c = 0; c < DV; c++) aq[r][c] = load(gq + (i0 + r0 + r) * D + c * W);
                            for (int j = 0; j < W && j0 + j < T; j++) {
                                vf kr[DV];
                                for (int c = 0; c < DV; c++) kr[c] = load(kb + (j0 + j) * s.ks[2] + c * W);
                                for (int r = 0; r < QR; r++) {
                                    const vf dd = splat(dst[r0 + r][j]);
                                    for (int c = 0; c < DV; c++) aq[r][c] += dd * kr[c];
                                }
                            }
                            for (int r = 0; r < QR; r++)
                                for (int c = 0; c < DV; c++) store(gq + (i0 + r0 + r) * D + c * W, aq[r][c]);
                        }
                    }
                }
                for (int64_t i = 0; i < T; i++)
                    std::memcpy(dq + ((b * s.H + h) * T + i) * D, gq + i * D, D * sizeof(float));
            }
            std::memcpy(dk + (b * s.KV + g) * T * D, gk, (size_t)(T * D) * sizeof(float));
            std::memcpy(dv + (b * s.KV + g) * T * D, gv, (size_t)(T * D) * sizeof(float));
        }
        std::free(kt); std::free(vt); std::free(gk); std::free(gv); std::free(gq); std::free(qs); std::free(go);
        std::free(delta);
    }
}

}  // namespace

extern "C" {

// The floats per vector this copy of the kernels was compiled for: 16 (AVX-512) or 8 (AVX2, and
// the generic build elsewhere). cpu_kernels.py reads it to say which build it loaded.
int slm_kernel_lanes(void) { return W; }

// out = softmax(q k^T * scale, causal) v, and lse = the log of each row's softmax denominator.
void slm_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                           const int64_t* dims, const int64_t* strides, float scale, int threads) {
    const Shape s(dims, strides);
    switch (s.D) {
        case 8: return forward<8>(q, k, v, out, lse, s, scale, threads);
        case 16: return forward<16>(q, k, v, out, lse, s, scale, threads);
#if defined(__AVX512F__)  // W = 16: 32 registers hold every accumulator of R rows
        case 32: return forward_tiled<2, 8, 2>(q, k, v, out, lse, s, scale, threads);
        case 48: return forward_tiled<3, 8, 3>(q, k, v, out, lse, s, scale, threads);
        case 64: return forward_tiled<4, 6, 4>(q, k, v, out, lse, s, scale, threads);
#else  // W = 8, 16 registers: 6 rows, 2 vectors of the output at a time
        case 32: return forward_tiled<4, 6, 2>(q, k, v, out, lse, s, scale, threads);
        case 48: return forward_tiled<6, 6, 2>(q, k, v, out, lse, s, scale, threads);
        case 64: return forward_tiled<8, 6, 2>(q, k, v, out, lse, s, scale, threads);
#endif
        default: return forward<0>(q, k, v, out, lse, s, scale, threads);
    }
}

// Gradients of the forward above: dq, dk, dv from dout, with the softmax rebuilt from lse.
void slm_attention_backward(const float* q, const float* k, const float* v, const float* out,
                            const float* dout, const float* lse, float* dq, float* dk, float* dv,
                            const int64_t* dims, const int64_t* strides, float scale, int threads) {
    const Shape s(dims, strides);
    switch (s.D) {
        case 8: return backward<8>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
        case 16: return backward<16>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
#if defined(__AVX512F__)
        case 32: return backward_tiled<2, 8, 8>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
        case 48: return backward_tiled<3, 8, 8>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
        case 64: return backward_tiled<4, 4, 8>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
#else
        case 32: return backward_tiled<4, 2, 2>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
        case 48: return backward_tiled<6, 2, 2>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
        case 64: return backward_tiled<8, 1, 1>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
#endif
        default: return backward<0>(q, k, v, out, dout, lse, dq, dk, dv, s, scale, threads);
    }
}

}  // extern "C"
