// Nucleus (top-p) sampling for a batch of rows in one call: what ContinuousBatch does for every
// sampled row of every step. The reference is PyTorch code in slmkit/generate/sampling.py
// (apply_top_p, then choose): it finds the nucleus with a topk of 64 or 512 logits, or a sort of
// the whole vocabulary when the distribution is wide (about 200 us a row on a 4k vocabulary), then
// draws from a float64 softmax and cumsum over the vocabulary. Here each row costs a few passes
// over its logits and a sort of only the few tokens whose place in the nucleus is in doubt:
//   1. the logits divided by the temperature (float32, as PyTorch divides) and their maximum; the
//      probabilities exp(x - max) / sum (vec.h's exp, float32 terms, a double sum);
//   2. a histogram of the probability mass over the top 11 bits of each probability's float
//      (exponent and 3 mantissa bits: monotone in the value; a probability <= 1 falls in the
//      lower 1024 buckets). Going down from the top bucket, the mass A(b) of buckets >= b tells
//      each bucket's fate: while A(b) < top_p - 1e-3 every token of bucket b is in the nucleus
//      (the mass before any of them is below the cut), once A(b + 1) >= top_p + 1e-3 none is;
//      the buckets between (usually one or two) are in doubt;
//   3. only the tokens in doubt are sorted by logit (ties: the lower id first) and cut as the
//      reference cuts: a token stays while the float32 sum of the probabilities before it (the
//      sure tokens' and then the sorted ones', accumulated in double, as PyTorch's CPU cumsum
//      does) is below top_p;
//   4. the draw inverts the float64 cumulative distribution of the kept tokens, in id order, at
//      u * total, as choose does with the row's own uniform number u.
// The result is the reference's token up to the float rounding of a sum landing exactly on a cut
// (the reference's own tiers differ the same way), and the order of tied logits at the nucleus's
// edge (torch.topk's order is unspecified; here the lower id stays first). Tested against it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

typedef float vh __attribute__((vector_size(W / 2 * sizeof(float))));  // half a vector of floats
typedef double vd __attribute__((vector_size(W / 2 * sizeof(double))));  // ... widened to doubles

struct Candidate {
    float x;
    int32_t id;
};

constexpr int kBuckets = 1024;  // the top 11 bits of a positive float <= 1: 8 exponent, 3 mantissa
constexpr double kMargin = 1e-3;  // how far from the cut a bucket's mass must be for its fate to be sure

inline int bucket(float p) {
    uint32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    return std::min(int(bits >> 20), kBuckets - 1);
}

inline float lowest(int b) {  // the smallest float in bucket b
    const uint32_t bits = uint32_t(b) << 20;
    float p;
    std::memcpy(&p, &bits, sizeof p);
    return p;
}

struct Scratch {
    std::vector<float> x, p;
    std::vector<double> mass, mass2, e;
    std::vector<Candidate> doubt;
    std::vector<int32_t> kept, ids, merged;
    void resize(int64_t vocab) {  // a thread's buffers, kept from call to call
        if (int64_t(x.size()) == vocab) return;
        x.resize(vocab), p.resize(vocab), e.resize(vocab);
        mass.resize(kBuckets), mass2.resize(kBuckets);
        doubt.reserve(vocab), kept.reserve(vocab), ids.reserve(vocab), merged.reserve(vocab);
    }
};

int64_t sample_row(const float* row, int64_t vocab, float temperature, float top_p, double u, Scratch& s) {
    // 1. the scaled logits and their maximum, then the probabilities
    float* x = s.x.data();
    vf vm = splat(-INFINITY);
    int64_t j = 0;
    if (temperature == 1.f) {
        std::memcpy(x, row, vocab * sizeof(float));
        for (; j + W <= vocab; j += W) vm = vmax(vm, load(x + j));
    } else {
        const vf t = splat(temperature);
        for (; j + W <= vocab; j += W) {
            const vf v = load(row + j) / t;
            store(x + j, v);
            vm = vmax(vm, v);
        }
        for (int64_t i = j; i < vocab; i++) x[i] = row[i] / temperature;
    }
    float m = hmax(vm);
    for (; j < vocab; j++) m = std::max(m, x[j]);
    if (!(m > -INFINITY)) return 0;  // no token is possible: the reference's NaNs give token 0 too
    float* p = s.p.data();
    // The sum in double lanes, each vector's halves widened and added: no horizontal sum per
    // vector (a chain of shuffles and scalar adds): 16 rows of a trained model, 4096 tokens, 108 -> 96 us
    vd acc0{}, acc1{};
    for (j = 0; j + W <= vocab; j += W) {
        const vf e = vexp(load(x + j) - splat(m));
        store(p + j, e);
        vh lo, hi;  // (memcpy, not __builtin_shufflevector: GCC has that only from 12)
        std::memcpy(&lo, &e, sizeof lo);
        std::memcpy(&hi, reinterpret_cast<const char*>(&e) + sizeof lo, sizeof hi);
        acc0 += __builtin_convertvector(lo, vd);
        acc1 += __builtin_convertvector(hi, vd);
    }
    double sum = 0;
    for (int l = 0; l < W / 2; l++) sum += acc0[l] + acc1[l];
    for (; j < vocab; j++) {
        p[j] = x[j] - m < -80.f ? 0.f : std::exp(x[j] - m);
        sum += p[j];
    }
    const float inv = float(1.0 / sum);
    {
        const vf vinv = splat(inv);
        for (j = 0; j + W <= vocab; j += W) store(p + j, load(p + j) * vinv);
        for (; j < vocab; j++) p[j] *= inv;
    }
    // 2. the fate of each bucket, which is monotone in the bucket: buckets >= sure are in the
    // nucleus, buckets < lo out, those between in doubt (top_p = 1: every possible token is in)
    int lo = 0, sure = 0;
    if (top_p < 1.f) {
        double* m0 = s.mass.data();
        double* m1 = s.mass2.data();  // two histograms: a token's add does not wait on its neighbour's
        std::fill(m0, m0 + kBuckets, 0.0);
        std::fill(m1, m1 + kBuckets, 0.0);
        for (j = 0; j + 1 < vocab; j += 2) {
            m0[bucket(p[j])] += p[j];
            m1[bucket(p[j + 1])] += p[j + 1];
        }
        if (j < vocab) m0[bucket(p[j])] += p[j];
        double above = 0;  // A(b + 1)
        sure = kBuckets;
        for (int b = kBuckets - 1; b >= 0; b--) {
            if (above >= double(top_p) + kMargin) {
                lo = b + 1;
                break;
            }
            above += m0[b] + m1[b];  // A(b)
            if (above < double(top_p) - kMargin) sure = b;
        }
    }
    // 3. the sure tokens (in id order) and their mass, then the tokens in doubt, sorted and cut.
    // A bucket's smallest float is its bits; a vector of tokens all below bucket lo is skipped.
    const float lo_p = lowest(lo), sure_p = sure < kBuckets ? lowest(sure) : INFINITY;
    double acc = 0;
    s.doubt.clear();
    s.ids.clear();
    for (j = 0; j < vocab; j += W) {
        const int64_t end = std::min<int64_t>(j + W, vocab);
        if (end - j == W) {
            const vi any = load(p + j) >= splat(lo_p);
            bool none = true;
            for (int l = 0; l < W; l++) none &= !any[l];
            if (none) continue;
        }
        for (int64_t t = j; t < end; t++) {
            if (!(x[t] > -INFINITY) || !(p[t] >= lo_p)) continue;
            if (p[t] >= sure_p) {
                acc += p[t];
                s.ids.push_back(int32_t(t));
            } else {
                s.doubt.push_back({x[t], int32_t(t)});
            }
        }
    }
    s.kept.clear();
    if (!s.doubt.empty()) {
        std::sort(s.doubt.begin(), s.doubt.end(),
                  [](const Candidate& a, const Candidate& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); });
        for (const Candidate& c : s.doubt) {
            acc += p[c.id];
            if (float(acc) - p[c.id] < top_p) s.kept.push_back(c.id);
        }
        std::sort(s.kept.begin(), s.kept.end());
    }
    // 4. the draw: a float64 softmax over the kept tokens in id order (the sure ones and those
    // kept from the doubt, merged), its running sum, and the first token whose sum exceeds
    // u * total (never past the last kept token)
    std::vector<int32_t>& ids = s.merged;
    ids.resize(s.ids.size() + s.kept.size());
    std::merge(s.ids.begin(), s.ids.end(), s.kept.begin(), s.kept.end(), ids.begin());
    double* e = s.e.data();
    const size_t n = ids.size();
    double total = 0;
    for (size_t k = 0; k < n; k++) {
        e[k] = std::exp(double(x[ids[k]]) - double(m));
        total += e[k];
    }
    if (n == 0) return 0;
    double run = 0;
    for (size_t k = 0; k < n; k++) {
        run += e[k] / total;
        e[k] = run;
    }
    const double last = e[n - 1];
    const double target = std::min(u * last, std::nextafter(last, 0.0));
    for (size_t k = 0; k < n; k++)
        if (e[k] > target) return ids[k];
    return ids[n - 1];
}

struct Rows {
    const float* logits;
    int64_t vocab;
    const int64_t* rows;
    float temperature, top_p;
    const double* u;
    int64_t* out;
};

void sample_task(void* p, int64_t r) {  // row r, on whichever thread claims it (its own scratch)
    const Rows& a = *(const Rows*)p;
    thread_local Scratch scratch;
    scratch.resize(a.vocab);
    a.out[r] = sample_row(a.logits + a.rows[r] * a.vocab, a.vocab, a.temperature, a.top_p, a.u[r], scratch);
}

}  // namespace

void slm_pool_for(int threads, int64_t n, void (*fn)(void*, int64_t), void* ctx);  // decode.cpp

// logits: (any rows, vocab) float32; rows: the n rows to sample (indices into logits); each is
// divided by the temperature (float32, as PyTorch divides), then cut to its nucleus; u: (n) uniform
// numbers in [0, 1), one from each row's generator; out: (n) the chosen ids. temperature > 0,
// top_p in (0, 1] (1: no nucleus, a plain draw from the softmax). The rows run on up to `threads`
// threads of the decode step's pool (a row is a few microseconds at a 4k vocabulary: a server's
// step samples 10-60 of them while its other core waits); a row's token never depends on them.
extern "C" void slm_sample_rows(const float* logits, int64_t vocab, int64_t n, const int64_t* rows, float temperature,
                                float top_p, const double* u, int64_t* out, int threads) {
    Rows a{logits, vocab, rows, temperature, top_p, u, out};
    slm_pool_for(threads, n, sample_task, &a);
}
