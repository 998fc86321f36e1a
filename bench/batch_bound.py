"""What batching N rows gains in the C++ decode step: N streaming clients' tokens/s over one client's
if nothing but ``slm serve``'s decode step took time (a step of N rows against a step of one, run as
the server runs them).

If nothing but the step took time, one client would get a token per one-row step, and N clients N
tokens per N-row step (every row busy every step). A prompt's tokens ride the steps one at a time
in both cases (the server's riding), so a request costs the same number of row-steps either way and
the ratio of their tokens/s is N t(1) / t(N), whatever the prompt and output lengths. Every other
cost comes on top (bench/serve.py measures them): a cost per step (the engine's Python around it)
is shared by N rows but paid by one client's every token, which lifts the measured ratio above
this one; a cost per token (text, HTTP, the clients) and the cores the step shares with them at N
clients pull it below. Steps here run as the server's do: bf16 products where the CPU has them, a bf16 KV cache, the
pool's threads resting between steps (``NativeDecoder.rest``), contexts of 32-96 slots (its loads'
prompts of ~32 tokens and 64 new ones). Alternating rounds, medians.

Beside each step, the share of this CPU's peak its matrix products reach (their floating-point
operations, 2 per weight per row, over the step's time and the peak of its threads together:
bench/cpu_peak.py, measured in this run for the kernels the step multiplies with). What a row
count's step does besides those products (attention over the cache, norms, the threads meeting
between layers) shows as the rest of the 100%.

    python bench/batch_bound.py            # stories15m shape, 2 threads, rows 1 4 16 64
    python bench/batch_bound.py --smoke    # seconds: stories260k shape, rows 1 and 4, a tmp file

Writes bench/results/batch_bound.json (docs/serving.md quotes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import save  # noqa: E402
from cpu_peak import measure, products_kind  # noqa: E402
from decode import MODELS, build  # noqa: E402
from step_holes import step_ms  # noqa: E402

from slmkit.decode import KVCache  # noqa: E402
from slmkit.decode.native import NativeDecoder, best_isa, bf16_arithmetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stories15m", choices=sorted(MODELS))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/batch_bound.json)")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k shape, rows 1 and 4, one round, "
                        "written to a temporary folder")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.rows, args.rounds, args.steps = "stories260k", [1, 4], 1, 200
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="slm-batch-bound-smoke-")) / "batch_bound.json")
    args.out = args.out or "bench/results/batch_bound.json"
    if args.rows[0] != 1:
        raise SystemExit("--rows must start with 1 (the one client every bound is against)")
    torch.set_num_threads(args.threads)
    model = build(args.preset, MODELS[args.preset])
    weights = bf16_arithmetic()  # what slm serve's --weights bf16 multiplies with on this CPU
    decoder = NativeDecoder(model, weights=weights, threads=args.threads)
    decoder.rest = True  # as the engine sets it
    gen = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {n: [] for n in args.rows}
    with torch.inference_mode():
        for r in range(args.rounds):
            for n in args.rows:
                cache = KVCache.empty(model.config, n, max_len=256, dtype=torch.bfloat16)
                ids = torch.randint(0, MODELS[args.preset], (n,), generator=gen)
                times[n].append(step_ms(decoder, cache, ids, None, max(50, args.steps // n)))
            print(f"round {r + 1}: " + ", ".join(f"{n} rows {v[-1]:.3f} ms" for n, v in times.items()), flush=True)
    step = {n: statistics.median(v) for n, v in times.items()}
    one = step[1]
    # "auto" (the default) is the best instruction set, as slm_decode_step resolves it
    isa = best_isa() if decoder.isa_name == "auto" else decoder.isa_name
    kind = products_kind(isa, weights)
    # GFLOP/s of the step's threads together
    peak = measure(args.threads, 0.02 if args.smoke else 0.2, kinds=[kind])[kind] * args.threads
    flops = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # per row
    summary = [{"rows": n, "step_ms": step[n], "us_per_row": step[n] / n * 1e3, "bound_vs_one": n * one / step[n],
                "products_of_peak": n * flops / (step[n] * 1e-3) / (peak * 1e9)} for n in args.rows]
    table = ["| rows (clients) | step | per row | tokens/s vs one client, the step alone | products, share of the "
             "CPU's peak |", "|---|---|---|---|---|"]
    table += [f"| {s['rows']} | {s['step_ms']:.3f} ms | {s['us_per_row']:.1f} us | {s['bound_vs_one']:.2f}x | "
              f"{100 * s['products_of_peak']:.0f}% |" for s in summary]
    table += ["", f"Medians of {args.rounds} alternating rounds: {args.preset} shape (random weights, vocab "
                  f"{MODELS[args.preset]}), {weights} weights, bf16 KV cache, contexts of 32-96 slots, "
                  f"{args.threads} threads resting between steps (as slm serve runs them). Products: "
                  f"{flops / 1e6:.1f} MFLOP a row; the peak, {kind} on {args.threads} threads at once: "
                  f"{peak:.0f} GFLOP/s (bench/cpu_peak.py, this run)."]
    print("\n".join(table))
    save(args.out, {"preset": args.preset, "weights": weights, "threads": args.threads, "rounds": times,
                    "product_flops_per_row": flops, "peak_kind": kind, "peak_gflops": peak, "summary": summary,
                    "table": table})


if __name__ == "__main__":
    main()
