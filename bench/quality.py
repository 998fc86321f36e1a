"""Quality per minute: train recipes for a fixed wall-clock budget, report bits per byte.

    python bench/quality.py --max-time 15m                      # the two recipes of the table
    python bench/quality.py --max-time 3m --try "lr5e-3: train.lr=5e-3"   # explore on top of cpu-15min

Each recipe trains with ``slm train --max-time`` on the shared TinyStories train.txt (prepared with
the project's tokenizer, vocab 4096) and is scored on all of the shared valid.txt with ``slm eval``
(the last checkpoint, every token of the file). Runs go one after another, each with all the cores;
the machine's load average is recorded with each result because the machine may be shared.
Results are appended as JSON lines to bench/results/quality.jsonl, each with its command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "tinystories"

# nanoGPT's config/train_shakespeare_char.py carried over: 6 layers, 6 heads, width 384, context 256,
# dropout 0.2, lr 1e-3 with warmup and cosine to 1e-4, beta2 0.99, learned positions, LayerNorm
# without biases, GELU, tied embeddings; batch 16 x 256 as in the nanoGPT measurement. Run the
# nanoGPT way: eager PyTorch, no compile.
NANOGPT = [
    "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256", "model.dropout=0.2",
    "model.positions=learned", "model.norm=layernorm", "model.activation=gelu", "model.bias=false",
    "model.tie_embeddings=true", "train.batch_size=16", "train.grad_accum=1", "train.lr=1e-3",
    "train.min_lr_ratio=0.1", "train.warmup_steps=100", "train.max_steps=5000", "train.schedule=cosine",
    "train.beta2=0.99", "train.weight_decay=0.1", "train.eval_interval=250", "train.checkpoint_interval=250",
    "train.compile=false",
]
RECIPES: dict[str, tuple[str | None, list[str]]] = {
    "nanogpt": (None, NANOGPT),
    "cpu-15min": ("cpu-15min", []),
}


def load_average() -> float:
    return os.getloadavg()[0]


def prepare_data(data: Path) -> None:
    """Tokenize the shared TinyStories files into ``data`` unless that was done already."""
    if (data / "meta.json").exists():
        return
    from slmkit.data import prepare

    prepare([str(SHARED / "train.txt")], data, vocab_size=4096, val_inputs=[str(SHARED / "valid.txt")])


def run_recipe(name: str, preset: str | None, overrides: list[str], data: Path, out: Path, max_time: str) -> dict:
    from slmkit.evaluate import evaluate_run
    from slmkit.train import train

    load_before, t0 = load_average(), time.time()
    summary = train(data, out / name, preset=preset, overrides=overrides, max_time=max_time, fresh=True, quiet=True)
    wall = time.time() - t0
    metrics = evaluate_run(out / name, data_dir=data, which="last")
    cmd = (f"slm train --data {data} --out {out / name} --fresh --max-time {max_time}"
           + (f" --preset {preset}" if preset else "") + "".join(" " + shlex.quote(o) for o in overrides)
           + f" && slm eval {out / name} --data {data} --which last")
    return {
        "recipe": name, "max_time": max_time, "val_bpb": metrics["bpb"], "val_loss": metrics["loss"],
        "steps": summary["steps"], "tokens": summary["tokens"], "tok_per_s": summary["tok_per_s"],
        "mfu": summary["mfu"], "wall_s": round(wall, 1), "load_before": load_before, "load_after": load_average(),
        "threads": __import__("torch").get_num_threads(), "command": cmd,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="15m")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="'NAME: overrides'",
                        help="an extra recipe: cpu-15min with these overrides")
    parser.add_argument("--data", default="/tmp/speed_ts", help="prepared data (made from the shared files if missing)")
    parser.add_argument("--out", default="/tmp/speed_quality", help="where the runs go")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "quality.jsonl"))
    args = parser.parse_args()

    data, out = Path(args.data), Path(args.out)
    prepare_data(data)
    todo = [(n, *RECIPES[n]) for n in args.recipes]
    for t in args.tries:
        name, _, over = t.partition(":")
        todo.append((name.strip(), "cpu-15min", over.split()))
    rows = []
    for name, preset, overrides in todo:
        row = run_recipe(name, preset, overrides, data, out, args.max_time)
        rows.append(row)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:24s} bpb {row['val_bpb']:.4f}  steps {row['steps']:5d}  {row['tok_per_s']:6,.0f} tok/s  "
              f"MFU {row['mfu']:.0%}  load {row['load_before']:.1f}->{row['load_after']:.1f}", flush=True)
    if len(rows) > 1:
        base = rows[0]["val_bpb"]
        print("\n| recipe | budget | val bpb | vs first | steps | tok/s | load |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['recipe']} | {r['max_time']} | {r['val_bpb']:.3f} | {r['val_bpb'] / base:.2f}x | {r['steps']} | "
                  f"{r['tok_per_s']:,.0f} | {r['load_before']:.1f} |")


if __name__ == "__main__":
    main()
