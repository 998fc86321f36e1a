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
//      the buckets between (usually one or two) are in doubt. Only the tokens whose probability
//      reaches tau are counted: together, those below it hold less than 1 - top_p, so the walk
//      never gets down to them (a few hundred tokens of 4k on a trained model's rows);
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
#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

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

struct Scratch {  // a thread's buffers, kept from call to call, each as long as the vocabulary
    std::vector<float> x, p;
    std::vector<double> mass, mass2, e;
    std::vector<Candidate> doubt;
    std::vector<int32_t> big, kept, ids, merged;
    void resize(int64_t vocab) {
        if (int64_t(x.size()) == vocab) return;
        x.resize(vocab), p.resize(vocab), e.resize(vocab);
        mass.resize(kBuckets), mass2.resize(kBuckets);
        doubt.resize(vocab), big.resize(vocab), kept.resize(vocab), ids.resize(vocab), merged.resize(vocab);
    }
};

// The lanes of a vector compare's result as bits (lane l: bit l).
inline uint32_t lane_bits(vi mask) {
#if defined(__AVX512F__)
    return _mm512_movepi32_mask((__m512i)mask);
#elif defined(__AVX2__)
    return (uint32_t)_mm256_movemask_ps((__m256)mask);
#else
    uint32_t bits = 0;
    for (int l = 0; l < W; l++) bits |= uint32_t(mask[l] != 0) << l;
    return bits;
#endif
}

int64_t sample_row(const float* row, int64_t vocab, float temperature, float top_p, double u, Scratch& s) {
    // 1. the scaled logits and their maximum, then the terms exp(x - max) and their sum
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
    // the terms' sum in double, from float sums of 8 vectors at a time (a float sum of 8 terms
    // per lane is exact to a few units of its last place; widening every vector cost a fifth
    // of the row)
    vd acc0{}, acc1{};
    const int64_t whole = vocab / W * W;
    for (j = 0; j < whole;) {
        vf block{};
        for (const int64_t stop = std::min(whole, j + 8 * W); j < stop; j += W) {
            const vf e = vexp(load(x + j) - splat(m));
            store(p + j, e);
            block += e;
        }
        float lanes[W];  // (through memory once a block, not __builtin_shufflevector: GCC has that only
        store(lanes, block);  // from 12; taking the address of block kept it in memory all the block long)
        vh lo, hi;
        std::memcpy(&lo, lanes, sizeof lo);
        std::memcpy(&hi, lanes + W / 2, sizeof hi);
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
    const auto prob = [p, inv](int64_t t) { return p[t] * inv; };  // a token's probability (p holds the terms)
    // 2. the fate of each bucket, which is monotone in the bucket: buckets >= sure are in the
    // nucleus, buckets < lo out, those between in doubt (top_p = 1: every possible token is in).
    // The tokens below tau = lowest(bucket((1 - top_p - 2 margins) / vocab)) together hold less
    // than 1 - top_p - 2 margins, so the walk down the buckets stops at or above tau's bucket: only
    // the tokens at or above tau (a few hundred of 4k on a trained model's rows) are counted and
    // looked at again. tau is 0 (every token) where top_p leaves no such room, or if the walk went
    // below tau's bucket after all (rounding): then it runs again over every token.
    const double room = (1.0 - double(top_p) - 2 * kMargin) / double(vocab);
    float tau = top_p < 1.f && room > 1e-30 ? lowest(bucket(float(room))) : 0.f;
    // (raw arrays and counts in locals: a push_back per token reloaded the thread's buffers, and
    // the constants the loop needs, from memory at every token)
    int32_t* big = s.big.data();
    size_t nbig = 0;
    {
        const vf vinv = splat(inv), vtau = splat(tau);
        for (j = 0; j < whole; j += W) {
            const vf v = load(p + j) * vinv;
            for (uint32_t bits = lane_bits(v >= vtau); bits; bits &= bits - 1) big[nbig++] = int32_t(j + __builtin_ctz(bits));
        }
        for (; j < vocab; j++)
            if (p[j] * inv >= tau) big[nbig++] = int32_t(j);
    }
    int lo = 0, sure = 0;
    while (top_p < 1.f) {
        double* m0 = s.mass.data();
        double* m1 = s.mass2.data();  // two histograms: a token's add does not wait on its neighbour's
        std::fill(m0, m0 + kBuckets, 0.0);
        std::fill(m1, m1 + kBuckets, 0.0);
        size_t k = 0;
        for (; k + 1 < nbig; k += 2) {
            const float a = prob(big[k]), b = prob(big[k + 1]);
            m0[bucket(a)] += a;
            m1[bucket(b)] += b;
        }
        if (k < nbig) m0[bucket(prob(big[k]))] += prob(big[k]);
        double above = 0;  // A(b + 1)
        lo = 0, sure = kBuckets;
        for (int b = kBuckets - 1; b >= 0; b--) {
            if (above >= double(top_p) + kMargin) {
                lo = b + 1;
                break;
            }
            above += m0[b] + m1[b];  // A(b)
            if (above < double(top_p) - kMargin) sure = b;
        }
        if (tau == 0.f || lowest(lo) >= tau) break;
        tau = 0.f;  // every token, in id order
        for (nbig = 0; nbig < size_t(vocab); nbig++) big[nbig] = int32_t(nbig);
    }
    // 3. the sure tokens (in id order) and their mass, then the tokens in doubt, sorted and cut
    const float lo_p = lowest(lo), sure_p = sure < kBuckets ? lowest(sure) : INFINITY;
    double acc = 0;
    Candidate* doubt = s.doubt.data();
    int32_t *sure_ids = s.ids.data(), *kept = s.kept.data();
    size_t ndoubt = 0, nsure = 0, nkept = 0;
    for (size_t k = 0; k < nbig; k++) {  // in id order
        const int32_t t = big[k];
        const float q = prob(t);
        if (!(x[t] > -INFINITY) || !(q >= lo_p)) continue;
        if (q >= sure_p) {
            acc += q;
            sure_ids[nsure++] = t;
        } else {
            doubt[ndoubt++] = {x[t], t};
        }
    }
    if (ndoubt) {
        std::sort(doubt, doubt + ndoubt,
                  [](const Candidate& a, const Candidate& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); });
        for (size_t k = 0; k < ndoubt; k++) {
            const float q = prob(doubt[k].id);
            acc += q;
            if (float(acc) - q < top_p) kept[nkept++] = doubt[k].id;
        }
        std::sort(kept, kept + nkept);
    }
    // 4. the draw: a float64 softmax over the kept tokens in id order (the sure ones and those
    // kept from the doubt, merged), its running sum, and the first token whose sum exceeds
    // u * total (never past the last kept token)
    int32_t* ids = s.merged.data();
    std::merge(sure_ids, sure_ids + nsure, kept, kept + nkept, ids);
    const size_t n = nsure + nkept;
    double* e = s.e.data();
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
