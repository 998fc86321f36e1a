"""How long a lone request waits for its first token in ``slm serve``'s engine, by prompt length.

Each request is one prompt of random token ids into an idle batch of the server's engine (its
decoder, bf16 KV cache and settings; no prefix cache, so every prompt runs whole), stepped in
this process until its first token: what one client waits for before HTTP. Prompts up to
``--prefill-chunk`` tokens ride the batch's steps; longer ones are prefilled a chunk a step
(docs/serving.md, How it works). Lengths alternate within each round; medians over rounds.

    python bench/first_token.py            # stories15m shape, 2 threads, prompts of 8 to 200 tokens
    python bench/first_token.py --smoke    # seconds: stories260k shape, 2 lengths, a tmp file

Writes bench/results/first_token.json (docs/serving.md quotes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import save  # noqa: E402
from decode import MODELS, build  # noqa: E402

from slmkit.generate.continuous import Seq  # noqa: E402
from slmkit.generate.sampling import SamplingConfig  # noqa: E402
from slmkit.serve.cli import make_engine  # noqa: E402
from slmkit.serve.config import ServeConfig  # noqa: E402


def first_token_ms(batch, prompt: list[int], seed: int) -> float:
    """Milliseconds from adding ``prompt`` to an idle batch to its first sampled token."""
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.8, top_p=0.95, seed=seed, stop_at_eot=False)
    seq = Seq(prompt, cfg, 1)
    t = time.perf_counter()
    batch.add(seq)
    while not seq.tokens:
        batch.step()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stories15m", choices=sorted(MODELS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 64, 100, 200])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/first_token.json)")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k shape, prompts of 8 and 40 "
                        "tokens, 3 rounds, written to a temporary folder")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.lengths, args.rounds = "stories260k", [8, 40], 3
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="slm-first-token-smoke-")) / "first_token.json")
    args.out = args.out or "bench/results/first_token.json"
    torch.set_num_threads(args.threads)
    vocab = MODELS[args.preset]
    model = build(args.preset, vocab).eval()
    cfg = ServeConfig(threads=args.threads, prefix_cache_mb=0)
    engine = make_engine(cfg, lambda: (model, None))
    engine.model = model  # the engine's own loading is for its worker; its batches need only the model
    if max(args.lengths) >= model.config.block_size:
        raise SystemExit(f"prompts must be shorter than the context ({model.config.block_size})")
    gen = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {n: [] for n in args.lengths}
    with torch.inference_mode():
        first_token_ms(engine.new_batch(), [1, 2, 3], 0)  # warm up (packing the weights)
        for r in range(args.rounds):
            for n in args.lengths:
                prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
                times[n].append(first_token_ms(engine.new_batch(), prompt, r))
            print(f"round {r + 1}: " + ", ".join(f"{n} tokens {v[-1]:.2f} ms" for n, v in times.items()), flush=True)
    summary = [{"prompt_tokens": n, "first_token_ms": statistics.median(v),
                "p90_ms": sorted(v)[min(len(v) - 1, round(0.9 * (len(v) - 1)))]} for n, v in times.items()]
    table = ["| prompt tokens | first token, median | p90 |", "|---|---|---|"]
    table += [f"| {s['prompt_tokens']} | {s['first_token_ms']:.1f} ms | {s['p90_ms']:.1f} ms |" for s in summary]
    table += ["", f"A lone request into an idle batch of slm serve's engine, no HTTP, no prefix cache: {args.preset} "
                  f"shape (random weights, vocab {vocab}), --threads {args.threads} --prefill-chunk "
                  f"{cfg.prefill_chunk} --kv-cache {cfg.kv_cache} --weights {cfg.weights}; medians of {args.rounds} "
                  f"rounds, lengths alternating."]
    print("\n".join(table))
    save(args.out, {"preset": args.preset, "threads": args.threads, "rounds": times, "summary": summary,
                    "table": table})


if __name__ == "__main__":
    main()
