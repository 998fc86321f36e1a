"""What a continuous batch's holes cost the C++ decode step: a step of 16 rows with 0, 1 and 4 of
them holes (rows whose sequence has left, kept for the next one), run along as before or skipped
(``NativeDecoder.step(holes=)``, what ``slm serve`` does). Alternating rounds, medians.

    python bench/step_holes.py            # stories15m shape, bf16 weights and KV cache, 2 threads

Writes bench/results/step_holes.json (docs/serving.md quotes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import save  # noqa: E402
from decode import MODELS, build  # noqa: E402

from slmkit.decode import KVCache  # noqa: E402
from slmkit.decode.native import NativeDecoder, bf16_arithmetic  # noqa: E402


def step_ms(decoder: NativeDecoder, cache: KVCache, ids: torch.Tensor, holes: torch.Tensor | None, steps: int) -> float:
    """Mean milliseconds of a step over ``steps`` steps at contexts of 32-96 slots."""
    kw = {} if holes is None else {"holes": holes}
    for _ in range(32):
        decoder.step(ids, cache, **kw)
    t = time.perf_counter()
    for _ in range(steps):
        if cache.length >= 96:
            cache.length = 32
        decoder.step(ids, cache, **kw)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stories15m", choices=sorted(MODELS))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/step_holes.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.preset, MODELS[args.preset])
    weights = bf16_arithmetic()  # what slm serve's --weights bf16 multiplies with on this CPU
    decoder = NativeDecoder(model, weights=weights, threads=args.threads)
    ids = torch.randint(0, MODELS[args.preset], (args.rows,), generator=torch.Generator().manual_seed(0))
    cases = [(0, False)] + [(n, skip) for n in (1, 4) for skip in (False, True)]
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for r in range(args.rounds):
            for n, skip in cases:
                cache = KVCache.empty(model.config, args.rows, max_len=256, dtype=torch.bfloat16)
                holes = torch.arange(args.rows) < n
                ms = step_ms(decoder, cache, ids, holes if skip else None, args.steps)
                times.setdefault(f"{n} holes {'skipped' if skip else 'run along'}", []).append(ms)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in times.items()), flush=True)
    summary = {k: statistics.median(v) for k, v in times.items()}
    table = ["| rows of 16 that are holes | step, holes run along | step, holes skipped |", "|---|---|---|"]
    table.append(f"| 0 | {summary['0 holes run along']:.3f} ms | |")
    for n in (1, 4):
        table.append(f"| {n} | {summary[f'{n} holes run along']:.3f} ms | {summary[f'{n} holes skipped']:.3f} ms |")
    table += ["", f"Medians of {args.rounds} alternating rounds of {args.steps} steps: {args.preset} shape (random "
                  f"weights, vocab {MODELS[args.preset]}), {args.rows} rows, {weights} weights, bf16 KV cache, contexts "
                  f"of 32-96 slots, {args.threads} threads."]
    print("\n".join(table))
    save(args.out, {"rounds": times, "summary": summary, "table": table})


if __name__ == "__main__":
    main()
