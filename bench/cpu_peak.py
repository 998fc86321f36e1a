"""This CPU's arithmetic peak, measured: the multiply-adds per second its vector units retire when
nothing but them limits a loop (independent accumulators in registers, no memory traffic), per core
and on all the threads asked for.

What a decode step's products are held against (bench/batch_bound.py: the share of this peak its
matrix products reach, as nanoGPT holds training against a GPU's datasheet peak). A cloud slice of a
CPU has no datasheet peak (its clock and its neighbours are unknown), so it is measured, in the same
run as what is held against it. One kernel for each kind of product slmkit's C++ step runs, each
with its own instruction set (a target attribute, as decode.cpp's products: one build serves every
x86 CPU), measured where the CPU has it:

- ``fp32-avx512``, ``fp32-avx2``: fused multiply-adds of 16 and 8 floats, the products of
  ``--weights fp32`` and of bf16 weights widened to float32 on AVX-512 and on AVX2;
- ``bf16-dot``: vdpbf16ps (AVX512-BF16: 16 lanes, each adding two bf16 products), the products of
  ``slm serve``'s default ``--weights bf16`` where the CPU has it;
- ``fp32``: multiply-adds of 4 floats as the compiler makes them (a NEON register on ARM).

    python bench/cpu_peak.py                  # writes bench/results/cpu_peak.json
    python bench/cpu_peak.py --smoke          # a second: one thread, short runs, a tmp file
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import save  # noqa: E402

from slmkit import cpu_kernels  # noqa: E402

SOURCE = r"""
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
// vdpbf16ps needs GCC 10 or Clang 9; an older compiler still builds the other kernels
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define SLM_PEAK_BF16 1
#endif

namespace {

// Each kernel: n rounds of K independent vector multiply-adds, their sum returned (so that the loop
// is not dropped). K: more than an instruction's latency times its throughput (FMA 4 x 2 on Zen 5
// and Golden Cove; vdpbf16ps on Zen 5 measured 7% faster with 24 than with 12), within the
// registers (32 with AVX-512 and on ARM, 16 with AVX2: 24 spilled there). The loop over them is
// unrolled so that they live in registers (rolled, -O2 kept them in memory: a third of the peak).
// One instruction set each, by target attribute, as decode.cpp's products.
#define ROUNDS(K, acc_t, zero, op, reduce)                                  \
    acc_t acc[K];                                                           \
    for (int i = 0; i < K; i++) acc[i] = zero;                              \
    for (int64_t r = 0; r < n; r++) {                                       \
        _Pragma("GCC unroll 24") for (int i = 0; i < K; i++) acc[i] = op;   \
    }                                                                       \
    float s = 0.f;                                                          \
    for (int i = 0; i < K; i++) s += reduce;                                \
    return s;

#if defined(__aarch64__)
constexpr int kGeneric = 24;
float fma_generic(int64_t n) {  // 4 lanes: a NEON register, fmla in place
    const float32x4_t x = vdupq_n_f32(0.999f), y = vdupq_n_f32(1e-3f);
    ROUNDS(kGeneric, float32x4_t, vdupq_n_f32(0.f), vfmaq_f32(acc[i], x, y), vaddvq_f32(acc[i]))
}
#else
constexpr int kGeneric = 12;
typedef float v4 __attribute__((vector_size(16)));
float fma_generic(int64_t n) {  // 4 lanes, as the compiler makes them (x86's baseline: SSE mulps and addps)
    const v4 x = {0.999f, 0.999f, 0.999f, 0.999f}, y = {1e-3f, 1e-3f, 1e-3f, 1e-3f};
    ROUNDS(kGeneric, v4, (v4{}), acc[i] * x + y, acc[i][0] + acc[i][1] + acc[i][2] + acc[i][3])
}
#endif

#if defined(__x86_64__)
__attribute__((target("avx512f"))) float fma_avx512(int64_t n) {
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-3f);
    ROUNDS(24, __m512, _mm512_setzero_ps(), _mm512_fmadd_ps(acc[i], x, y), _mm512_reduce_add_ps(acc[i]))
}

__attribute__((target("avx2,fma"))) float fma_avx2(int64_t n) {
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-3f);
    ROUNDS(12, __m256, _mm256_setzero_ps(), _mm256_fmadd_ps(acc[i], x, y), acc[i][0] + acc[i][7])
}
#endif

#if defined(SLM_PEAK_BF16)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) float dot_avx512(int64_t n) {
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3a83);
    ROUNDS(24, __m512, _mm512_setzero_ps(), _mm512_dpbf16_ps(acc[i], a, b), _mm512_reduce_add_ps(acc[i]))
}
#endif

typedef float (*Kernel)(int64_t);

// kind: 0 fp32 on 4 lanes, 1 fp32 AVX2 (8), 2 fp32 AVX-512 (16), 3 vdpbf16ps (16 lanes of 2
// products); null where this CPU cannot run it (the features decode.cpp checks for its products)
Kernel kernel(int kind) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (kind == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? fma_avx2 : nullptr;
    if (kind == 2) return __builtin_cpu_supports("avx512f") ? fma_avx512 : nullptr;
#endif
#if defined(SLM_PEAK_BF16)
    if (kind == 3)
        return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") ? dot_avx512 : nullptr;
#endif
    return kind == 0 ? fma_generic : nullptr;
}
}  // namespace

// Floating-point operations per round of a kernel; 0: this CPU (or build) has no such kernel.
extern "C" double peak_flops_per_round(int kind) {
    static const int lanes[] = {4, 8, 16, 32}, accumulators[] = {kGeneric, 12, 24, 24};
    return kind >= 0 && kind < 4 && kernel(kind) ? 2.0 * accumulators[kind] * lanes[kind] : 0.0;
}

// Seconds for `n` rounds of a kernel on each of `threads` threads at once (the slowest thread's);
// -1 for a kernel this CPU cannot run.
extern "C" double peak_seconds(int kind, int64_t n, int threads) {
    const Kernel run = kind >= 0 && kind < 4 ? kernel(kind) : nullptr;
    if (run == nullptr) return -1.0;
    std::vector<std::thread> pool;
    std::vector<double> took(threads);
    std::vector<float> sink(threads);
    for (int t = 0; t < threads; t++)
        pool.emplace_back([&, t] {
            const auto t0 = std::chrono::steady_clock::now();
            sink[t] = run(n);
            took[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        });
    for (auto& th : pool) th.join();
    double worst = 0.0;
    for (int t = 0; t < threads; t++) worst = took[t] > worst ? took[t] : worst;
    return sink[0] == -1.f ? -1.0 : worst;  // the sums are used, so the loops are not dropped
}
"""

# The kernels, by the name of the products they stand for (each measured where the CPU has it).
KINDS = {"fp32": 0, "fp32-avx2": 1, "fp32-avx512": 2, "bf16-dot": 3}


def build() -> ctypes.CDLL:
    """The kernels, compiled and loaded (each with its own instruction set, chosen at run time: no
    -march, so one build serves every x86 CPU); the files go once loaded."""
    compiler = cpu_kernels.compiler()
    if compiler is None:
        raise SystemExit("bench/cpu_peak.py needs a C++ compiler (g++ or clang++)")
    with tempfile.TemporaryDirectory(prefix="slm-cpu-peak-") as folder:
        src, lib_path = Path(folder) / "peak.cpp", Path(folder) / "peak.so"
        src.write_text(SOURCE)
        flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=fast"]
        done = subprocess.run([compiler, *flags, str(src), "-o", str(lib_path)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bench/cpu_peak.py: {compiler} failed: {done.stderr.strip()[-400:]}")
        lib = ctypes.CDLL(str(lib_path))  # mapped: it outlives its file
    lib.peak_flops_per_round.argtypes, lib.peak_flops_per_round.restype = [ctypes.c_int], ctypes.c_double
    lib.peak_seconds.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    lib.peak_seconds.restype = ctypes.c_double
    return lib


def products_kind(isa: str, weights: str | None) -> str:
    """The kernel that stands for a C++ decode step's products: its weights' format (``bf16-dot``:
    vdpbf16ps; bf16 and fp32 both multiply in float32) and its instruction set (avx512, avx2 or
    scalar: ``NativeDecoder.isa_name``, with "auto" resolved by ``native.best_isa``)."""
    if weights == "bf16-dot":
        return "bf16-dot"
    return {"avx512": "fp32-avx512", "avx2": "fp32-avx2"}.get(isa, "fp32")


def measure(threads: int = 1, seconds: float = 0.2, repeats: int = 5, kinds: list[str] | None = None
            ) -> dict[str, float]:
    """GFLOP/s of each kernel in ``kinds`` (default: all) this CPU runs, per thread, with
    ``threads`` threads running it at once (the best of ``repeats`` runs of about ``seconds`` each:
    a peak is what the core can do, and a run a neighbour or the OS interrupts only shows less)."""
    lib = build()
    peaks = {}
    for name in kinds or KINDS:
        kind = KINDS[name]
        per_round = lib.peak_flops_per_round(kind)
        if not per_round:
            continue
        n = 1000
        while lib.peak_seconds(kind, n, 1) < seconds / 4:  # rounds for about `seconds`
            n *= 4
        best = min(lib.peak_seconds(kind, n, threads) for _ in range(repeats))
        peaks[name] = per_round * n / best / 1e9
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/cpu_peak.json)")
    parser.add_argument("--smoke", action="store_true", help="a second: one thread, short runs, written to a "
                        "temporary folder")
    args = parser.parse_args()
    seconds = 0.2
    if args.smoke:
        args.threads, seconds = [1], 0.02
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="slm-peak-smoke-")) / "cpu_peak.json")
    args.out = args.out or "bench/results/cpu_peak.json"
    rows = [{"threads": t, **{f"{k}_gflops_per_thread": v for k, v in measure(t, seconds).items()}}
            for t in args.threads]
    table = ["| threads | " + " | ".join(k for k in rows[0] if k != "threads") + " |", "|---" * len(rows[0]) + "|"]
    table += ["| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r.values()) + " |" for r in rows]
    print("\n".join(table))
    save(args.out, {"summary": rows, "table": table})


if __name__ == "__main__":
    main()
