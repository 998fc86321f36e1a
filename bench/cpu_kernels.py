"""slmkit's CPU kernels against PyTorch's ops, forward and backward, alternating in one process.

    python bench/cpu_kernels.py                 # 2 threads, the shapes below
    python bench/cpu_kernels.py --threads 1
    python bench/cpu_kernels.py --dtype bfloat16   # as under bf16 autocast: PyTorch's bf16 ops against the kernels
    python bench/cpu_kernels.py --smoke     # seconds: one small shape, 1 round, a temporary file

On a CPU where the kernels are off (no AVX-512, see ``slmkit.cpu_kernels.available()``) it stops
with one line saying why: there is nothing to compare.

Each shape is (batch, heads, kv heads, context, head size): stories260k's and stories15m's training
shapes first, then other head sizes the kernel takes. SDPA gets q, k and v as the model makes them,
with k and v repeated for grouped-query attention as the model's SDPA path does. Times are medians
of --rounds alternating rounds (forward, then backward of a random gradient); the result goes to
bench/results/cpu_kernels.json with the command that reproduces it.

The fused head + loss (``HEADS``: 16 x 256 rows of stories260k's and stories15m's widths, vocab
4096) is timed too: ``ChunkedCrossEntropy`` forward and backward through the kernel loop against its
PyTorch loop. With ``--dtype bfloat16`` attention gets bf16 q, k, v (SDPA in bf16 against the kernel
on float32 copies) and the head runs under bf16 autocast, as in a ``train.dtype=bfloat16`` step:
this is the measurement behind keeping the kernels on in bf16.
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
from slmkit.loss import ChunkedCrossEntropy, ce_chunk_rows  # noqa: E402

SHAPES = [(16, 8, 4, 256, 8), (16, 6, 6, 256, 48), (16, 8, 8, 256, 16), (16, 9, 9, 256, 32),
          (16, 8, 8, 256, 64), (4, 6, 6, 1024, 48), (2, 8, 8, 1024, 64)]
HEADS = [(16 * 256, 64, 4096), (16 * 256, 288, 4096)]  # rows, width, vocab: stories260k, stories15m


def time_head(rows: int, width: int, vocab: int, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    """Medians (ms) of the fused head's forward + backward through PyTorch's loop and the kernel's."""
    torch.manual_seed(0)
    h, w = torch.randn(rows, width) * 0.5, torch.randn(vocab, width) * 0.02
    targets = torch.randint(0, vocab, (rows,))
    chunk = ce_chunk_rows(h, vocab)
    usable = cpu_kernels.head_loss_usable
    times: dict[str, list[float]] = {"pytorch": [], "slmkit": []}
    try:
        for r in range(rounds):
            for name in ("pytorch", "slmkit") if r % 2 == 0 else ("slmkit", "pytorch"):
                cpu_kernels.head_loss_usable = usable if name == "slmkit" else lambda h, w: False
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = ChunkedCrossEntropy.apply(hh, ww, targets, chunk)
                loss.backward()
                times[name].append(time.perf_counter() - t0)
    finally:
        cpu_kernels.head_loss_usable = usable
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: q, k, v in bf16 and the head under bf16 autocast, as train.dtype=bfloat16")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/cpu_kernels.json)")
    parser.add_argument("--smoke", action="store_true", help="one small shape, 1 round, a temporary file")
    args = parser.parse_args()
    shapes, heads = SHAPES, HEADS
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        import tempfile

        shapes, args.rounds = [(2, 2, 2, 32, 8)], 1
        heads = [(64, 16, 100)]
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="slm-cpu-kernels-smoke-")) / "cpu_kernels.json")
    args.out = args.out or str(ROOT / "bench" / "results" / "cpu_kernels.json")
    if cpu_kernels.available() is not None:
        sys.exit(f"error: {cpu_kernels.available()}")
    torch.set_num_threads(args.threads)
    rows = []
    for B, H, KV, T, D in shapes:
        torch.manual_seed(0)
        qkv = torch.randn(B, T, (H + 2 * KV) * D).to(dtype).requires_grad_()
        q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
        q, k, v = (x.view(B, T, -1, D).transpose(1, 2) for x in (q, k, v))
        grad = torch.randn(B, T, H * D).to(dtype)
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
    head_rows = [{"rows": n, "width": c, "vocab": v, **{f"{k}_ms": t for k, t in time_head(n, c, v, dtype, args.rounds).items()}}
                 for n, c, v in heads]
    print(f"\n{args.threads} threads, {args.dtype}, medians of {args.rounds} rounds, ms\n")
    print("| B x H (KV) x T x D | SDPA forward | slmkit forward | SDPA backward | slmkit backward | forward + backward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, a, b = r["shape"], r["sdpa_ms"], r["slmkit_ms"]
        ratio = (a["forward"] + a["backward"]) / (b["forward"] + b["backward"])
        print(f"| {s['batch']} x {s['heads']} ({s['kv_heads']}) x {s['context']} x {s['head_size']} | "
              f"{a['forward']:.2f} | {b['forward']:.2f} | {a['backward']:.2f} | {b['backward']:.2f} | {ratio:.2f}x |")
    print("\n| fused head: rows x width x vocab | PyTorch forward + backward | slmkit forward + backward | speed-up |")
    print("|---|---|---|---|")
    for r in head_rows:
        print(f"| {r['rows']} x {r['width']} x {r['vocab']} | {r['pytorch_ms']:.2f} | {r['slmkit_ms']:.2f} | "
              f"{r['pytorch_ms'] / r['slmkit_ms']:.2f}x |")
    out = {**machine_info(), "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "dtype": args.dtype, "rounds": args.rounds, "shapes": rows, "heads": head_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
