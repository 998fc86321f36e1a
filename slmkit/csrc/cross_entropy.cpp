// Cross-entropy of a chunk of logits and its gradient, in one pass per row, for CPU training in
// float32. Used by the model's fused head (ChunkedCrossEntropy): for each row of logits x with
// target t (or -1, ignored), the loss lse(x) - x[t] and the gradient (softmax(x) - onehot(t)) * g.
//
// Why: the same computation written in PyTorch ops runs as two fused inductor loops per chunk
// (the log-sum-exp, then the softmax with the one-hot subtracted), each recomputing exp; here
// each row is read three times while it is in L1 (max; exp, kept; scale) and exp runs once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

extern "C" {

// grad (rows, V) = (softmax(x) - onehot(target)) * g for kept rows, 0 for ignored ones;
// loss[r] = lse(x_r) - x_r[target_r] (0 when ignored). grad may be x itself (in place).
void slm_cross_entropy(const float* x, const int64_t* target, float* grad, float* loss,
                       int64_t rows, int64_t V, float g, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * V;
        float* gr = grad + r * V;
        const int64_t t = target[r];
        if (t < 0 || t >= V) {  // ignored (-1), or out of range: a NaN loss says so, memory stays safe
            std::memset(gr, 0, (size_t)V * sizeof(float));
            loss[r] = t < 0 ? 0.f : NAN;
            continue;
        }
        const float xt = xr[t];  // read before an in-place gradient overwrites it
        const int64_t full = V / W * W;
        vf m0 = splat(-INFINITY), m1 = m0;
        int64_t j = 0;
        for (; j + 2 * W <= full; j += 2 * W) {
            m0 = vmax(m0, load(xr + j));
            m1 = vmax(m1, load(xr + j + W));
        }
        for (; j < full; j += W) m0 = vmax(m0, load(xr + j));
        float m = hmax(vmax(m0, m1));
        for (; j < V; j++) m = std::max(m, xr[j]);
        vf s0 = splat(0.f), s1 = s0;
        for (j = 0; j + 2 * W <= full; j += 2 * W) {
            const vf e0 = vexp(load(xr + j) - splat(m)), e1 = vexp(load(xr + j + W) - splat(m));
            store(gr + j, e0);
            store(gr + j + W, e1);
            s0 += e0;
            s1 += e1;
        }
        for (; j < full; j += W) {
            const vf e = vexp(load(xr + j) - splat(m));
            store(gr + j, e);
            s0 += e;
        }
        float s = hsum(s0 + s1);
        for (; j < V; j++) {
            gr[j] = std::exp(xr[j] - m);
            s += gr[j];
        }
        loss[r] = m + std::log(s) - xt;
        const float scale = g / s;
        for (j = 0; j < full; j += W) store(gr + j, load(gr + j) * splat(scale));
        for (; j < V; j++) gr[j] *= scale;
        gr[t] -= g;
    }
}

}  // extern "C"
