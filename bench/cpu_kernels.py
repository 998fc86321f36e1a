"""slmkit's CPU attention kernel against PyTorch's SDPA, forward and backward, alternating in one process.

    python bench/cpu_kernels.py                 # 2 threads, the shapes below
    python bench/cpu_kernels.py --threads 1
    python bench/cpu_kernels.py --smoke     # seconds: one small shape, 1 round, a temporary file

On a CPU where the kernels are off (no AVX-512, see ``slmkit.cpu_kernels.available()``) it stops
with one line saying why: there is nothing to compare.

Each shape is (batch, heads, kv heads, context, head size): stories260k's and stories15m's training
shapes first, then other head sizes the kernel takes. SDPA gets q, k and v as the model makes them,
with k and v repeated for grouped-query attention as the model's SDPA path does. Times are medians
of --rounds alternating rounds (forward, then backward of a random gradient); the result goes to
bench/results/cpu_kernels.json with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402

from slmkit import cpu_kernels  # noqa: E402

SHAPES = [(16, 8, 4, 256, 8), (16, 6, 6, 256, 48), (16, 8, 8, 256, 16), (16, 9, 9, 256, 32),
          (16, 8, 8, 256, 64), (4, 6, 6, 1024, 48), (2, 8, 8, 1024, 64)]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/cpu_kernels.json)")
    parser.add_argument("--smoke", action="store_true", help="one small shape, 1 round, a temporary file")
    args = parser.parse_args()
    shapes = SHAPES
    if args.smoke:
        import tempfile

        shapes, args.rounds = [(2, 2, 2, 32, 8)], 1
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="slm-cpu-kernels-smoke-")) / "cpu_kernels.json")
    args.out = args.out or str(ROOT / "bench" / "results" / "cpu_kernels.json")
    if cpu_kernels.available() is not None:
        sys.exit(f"error: {cpu_kernels.available()}")
    torch.set_num_threads(args.threads)
    rows = []
    for B, H, KV, T, D in shapes:
        torch.manual_seed(0)
        qkv = torch.randn(B, T, (H + 2 * KV) * D, requires_grad=True)
        q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
        q, k, v = (x.view(B, T, -1, D).transpose(1, 2) for x in (q, k, v))
        grad = torch.randn(B, T, H * D)
        times: dict[str, list[tuple[float, float]]] = {"sdpa": [], "slmkit": []}
        for r in range(args.rounds):
            for name in ("sdpa", "slmkit") if r % 2 == 0 else ("slmkit", "sdpa"):
                f = sdpa if name == "sdpa" else cpu_kernels.causal_attention
                t0 = time.perf_counter()
                y = f(q, k, v)
                t1 = time.perf_counter()
                y.backward(grad)
                times[name].append((t1 - t0, time.perf_counter() - t1))
        med = {n: [statistics.median(t[i] for t in ts) * 1e3 for i in (0, 1)] for n, ts in times.items()}
        rows.append({"shape": {"batch": B, "heads": H, "kv_heads": KV, "context": T, "head_size": D},
                     "sdpa_ms": {"forward": med["sdpa"][0], "backward": med["sdpa"][1]},
                     "slmkit_ms": {"forward": med["slmkit"][0], "backward": med["slmkit"][1]},
                     "model_uses_kernel": cpu_kernels.attention_pays(D)})
    print(f"\n{args.threads} threads, medians of {args.rounds} rounds, ms\n")
    print("| B x H (KV) x T x D | SDPA forward | slmkit forward | SDPA backward | slmkit backward | forward + backward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, a, b = r["shape"], r["sdpa_ms"], r["slmkit_ms"]
        ratio = (a["forward"] + a["backward"]) / (b["forward"] + b["backward"])
        print(f"| {s['batch']} x {s['heads']} ({s['kv_heads']}) x {s['context']} x {s['head_size']} | "
              f"{a['forward']:.2f} | {b['forward']:.2f} | {a['backward']:.2f} | {b['backward']:.2f} | {ratio:.2f}x |")
    out = {**machine_info(), "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "rounds": args.rounds, "shapes": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
