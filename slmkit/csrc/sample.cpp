// Nucleus (top-p) sampling for a batch of rows in one call: what ContinuousBatch does for every
// sampled row of every step. The reference is PyTorch code in slmkit/generate/sampling.py
// (apply_top_p, then choose): it finds the nucleus with a topk of 64 or 512 logits, or a sort of
// the whole vocabulary when the distribution is wide (about 200 us a row on a 4k vocabulary), then
// draws from a float64 softmax and cumsum over the vocabulary. Here each row costs a few passes
// over its logits and a sort of only the tokens that can be in the nucleus:
//   1. probabilities: exp(x - max) / sum (vec.h's exp, float32 terms, a double sum);
//   2. a histogram of the probability mass over the top 11 bits of each probability's float
//      (exponent and 3 mantissa bits: monotone in the value) finds a bound b such that the tokens
//      in buckets >= b hold at least top_p + 1e-3 of the mass: the nucleus is among them;
//   3. those candidates are sorted by logit (ties: the lower id first) and cut as the reference
//      cuts: a token stays while the float32 sum of the probabilities before it (accumulated in
//      double, as PyTorch's CPU cumsum does) is below top_p;
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

struct Candidate {
    float x;
    int32_t id;
};

constexpr int kBuckets = 2048;  // the top 11 bits of a positive float: 8 exponent, 3 mantissa

inline int bucket(float p) {
    uint32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    return int(bits >> 20);
}

int64_t sample_row(const float* x, int64_t vocab, float top_p, double u, std::vector<float>& probs,
                   std::vector<double>& mass, std::vector<Candidate>& cand, std::vector<int32_t>& kept) {
    // 1. the maximum, then the probabilities
    vf vm = splat(-INFINITY);
    int64_t j = 0;
    for (; j + W <= vocab; j += W) vm = vmax(vm, load(x + j));
    float m = hmax(vm);
    for (; j < vocab; j++) m = std::max(m, x[j]);
    if (!(m > -INFINITY)) return 0;  // no token is possible: the reference's NaNs give token 0 too
    float* p = probs.data();
    double sum = 0;
    for (j = 0; j + W <= vocab; j += W) {
        const vf e = vexp(load(x + j) - splat(m));
        store(p + j, e);
        sum += hsum(e);
    }
    for (; j < vocab; j++) {
        p[j] = x[j] - m < -80.f ? 0.f : std::exp(x[j] - m);
        sum += p[j];
    }
    const float inv = float(1.0 / sum);
    for (j = 0; j < vocab; j++) p[j] *= inv;
    // 2. the bucket bound
    int bound = 0;
    if (top_p < 1.f) {
        std::fill(mass.begin(), mass.end(), 0.0);
        for (j = 0; j < vocab; j++) mass[bucket(p[j])] += p[j];
        double acc = 0;
        for (int b = kBuckets - 1; b > 0; b--) {
            acc += mass[b];
            if (acc >= double(top_p) + 1e-3) {
                bound = b;
                break;
            }
        }
    }
    // 3. the candidates, sorted, and the cut (bound 0: every possible token is a candidate)
    cand.clear();
    for (j = 0; j < vocab; j++)
        if (x[j] > -INFINITY && bucket(p[j]) >= bound) cand.push_back({x[j], int32_t(j)});
    kept.clear();
    if (top_p < 1.f) {
        std::sort(cand.begin(), cand.end(),
                  [](const Candidate& a, const Candidate& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); });
        double acc = 0;
        for (const Candidate& c : cand) {
            acc += p[c.id];
            if (float(acc) - p[c.id] < top_p) kept.push_back(c.id);
        }
        std::sort(kept.begin(), kept.end());
    } else {
        for (const Candidate& c : cand) kept.push_back(c.id);
    }
    // 4. the draw: a float64 softmax over the kept tokens in id order, its running sum, and the
    // first token whose sum exceeds u * total (never past the last kept token)
    double total = 0;
    for (int32_t id : kept) total += std::exp(double(x[id]) - double(m));
    double run = 0;
    std::vector<double>& cdf = mass;  // reused: at least as long as kept
    for (size_t k = 0; k < kept.size(); k++) {
        run += std::exp(double(x[kept[k]]) - double(m)) / total;
        cdf[k] = run;
    }
    const double last = cdf[kept.size() - 1];
    const double target = std::min(u * last, std::nextafter(last, 0.0));
    for (size_t k = 0; k < kept.size(); k++)
        if (cdf[k] > target) return kept[k];
    return kept.back();
}

}  // namespace

// logits: (any rows, vocab) float32; rows: the n rows to sample (indices into logits); each is
// divided by the temperature (float32, as PyTorch divides), then cut to its nucleus; u: (n) uniform
// numbers in [0, 1), one from each row's generator; out: (n) the chosen ids. temperature > 0,
// top_p in (0, 1] (1: no nucleus, a plain draw from the softmax).
extern "C" void slm_sample_rows(const float* logits, int64_t vocab, int64_t n, const int64_t* rows, float temperature,
                                float top_p, const double* u, int64_t* out) {
    std::vector<float> x(vocab), probs(vocab);
    std::vector<double> mass(std::max<int64_t>(kBuckets, vocab));
    std::vector<Candidate> cand;
    std::vector<int32_t> kept;
    cand.reserve(vocab);
    kept.reserve(vocab);
    for (int64_t r = 0; r < n; r++) {
        const float* row = logits + rows[r] * vocab;
        for (int64_t j = 0; j < vocab; j++) x[j] = temperature == 1.f ? row[j] : row[j] / temperature;
        out[r] = sample_row(x.data(), vocab, top_p, u[r], probs, mass, cand, kept);
    }
}
