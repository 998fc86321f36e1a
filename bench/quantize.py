"""Weight-only quantization (``slm quantize``) on a trained model: file size, bits per byte, speed.

    python bench/quantize.py --max-time 4m                # trains the stories260k shape on TinyStories, then measures
    python bench/quantize.py --run RUN_DIR --data DATA    # an existing run and its DATA_DIR (--name for the results)
    python bench/quantize.py --smoke                      # seconds: a toy corpus, a tmp dir

Without ``--run`` the data is ``bench/quality.py``'s split of the shared TinyStories (BPE ``--vocab``,
default 4096; the last 500 stories of train.txt as DATA/test.txt, valid.txt as val) and the model is
the ``stories260k`` preset with ``model.mlp_hidden=192`` (llama2.c's 172 is not a multiple of the
32-value blocks; 192 is slmkit's own SwiGLU rounding), trained for ``--max-time``.

Each row is one ``slm quantize`` setting (``quantize_run``) of that run's last checkpoint: the bytes
of its ``model.safetensors``, bits per byte on val and test (every token, as ``slm eval`` counts
them) and greedy decode tokens/s at batch 1 (``--new-tokens``, no stopping, rows alternating for
``--rounds`` rounds, medians). The default decoder (``decode.NativeDecoder``) computes on a
quantized run's int8/int4 blocks themselves (``csrc/qdecode.cpp``), so the tokens/s column is the
packed path's; bpb is ``model.forward``'s on the float32 values the blocks stand for. The ``+ AWQ``
rows fold activation-aware scales searched on 256 windows of the DATA_DIR's train split
(``--calibrate 256``) before packing; val and test are never seen by the search. Writes
bench/results/quantize_<name>.json (``--out``) with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402
from export_int8 import bpb, text_tokens  # noqa: E402
from quality import SHARED, TEST_STORIES, prepare_data, smoke_corpus  # noqa: E402

from slmkit.errors import SlmError  # noqa: E402
from slmkit.quant import QuantConfig  # noqa: E402

ROWS = {  # name -> QuantConfig (None: the float32 run itself)
    "fp32": None,
    "int8, groups of 32 (q8_0)": QuantConfig(8, 32),
    "int8, per output channel": QuantConfig(8, 0),
    "int4, groups of 32 (q4_0)": QuantConfig(4, 32),
    "int4, groups of 64": QuantConfig(4, 64),
    "int4, groups of 128": QuantConfig(4, 128),
    "int8 q8_0, embeddings too": QuantConfig(8, 32, embeddings=True),
    "int4 q4_0, embeddings too": QuantConfig(4, 32, embeddings=True),
    "int4 q4_0 + AWQ scales": QuantConfig(4, 32, calibrate=256),
    "int4, groups of 64 + AWQ scales": QuantConfig(4, 64, calibrate=256),
    "int4 q4_0 + AWQ, embeddings too": QuantConfig(4, 32, embeddings=True, calibrate=256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained RUN_DIR (its last checkpoint)")
    parser.add_argument("--data", type=Path, help="the run's DATA_DIR (val split, and test.txt when there)")
    parser.add_argument("--max-time", default="4m", help="training time when no --run is given")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--work", type=Path, help="where to keep data and run (default: a tmp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/quantize_<name>.json)")
    parser.add_argument("--name", help="the model's name in the results (default: the run folder's, or stories260k when trained here)")
    parser.add_argument("--smoke", action="store_true", help="a toy corpus, the tiny preset, 20 steps, 1 round, a tmp dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit.checkpoint import load_run
    from slmkit.export.quantize import quantize_run
    from slmkit.generate import SamplingConfig, generate_tokens

    work = args.work or Path(tempfile.mkdtemp(prefix="slm-quantize-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    trained_here = None
    if args.run is None:
        trained_here = "stories260k"
        if args.smoke:
            train_txt, valid_txt = smoke_corpus(work / "corpus")
            args.vocab, args.rounds, args.new_tokens = 300, 1, 8
            preset, overrides = "tiny", ["train.max_steps=20", "model.n_embd=64", "model.n_head=4"]
        else:
            train_txt, valid_txt = SHARED / "train.txt", SHARED / "valid.txt"
            preset, overrides = "stories260k", ["model.mlp_hidden=192"]
        args.data = work / "data"
        prepare_data(args.data, train_txt, valid_txt, 20 if args.smoke else TEST_STORIES, args.vocab)
        from slmkit.train import train

        args.run = work / "run"
        train(args.data, args.run, preset=preset, max_time=None if args.smoke else args.max_time,
              overrides=overrides + ["train.plot=false"], quiet=True)
    name = "smoke" if args.smoke else args.name or (args.run.name if trained_here is None else trained_here)
    out = Path(args.out) if args.out else (work / "quantize.json" if args.smoke
                                           else ROOT / "bench" / "results" / f"quantize_{name}.json")

    runs, refused = {}, {}
    for i, (row, cfg) in enumerate(ROWS.items()):
        try:
            data = args.data if cfg is not None and cfg.calibrate else None  # AWQ: windows of the train split
            runs[row] = args.run if cfg is None else quantize_run(args.run, work / f"q{i}", cfg, which="last", data=data)
        except SlmError as e:  # a group that does not tile this model's rows
            refused[row] = str(e)
            print(f"{row}: refused: {e}", file=sys.stderr)
    models = {row: load_run(path, which="last")[0] for row, path in runs.items()}
    tok = load_run(args.run, which="last")[1]
    splits: dict[str, np.ndarray] = {}
    if args.data is not None:
        from slmkit.data import open_split

        splits["val"] = np.asarray(open_split(args.data, "val"), dtype=np.int64)
        if (args.data / "test.txt").exists():
            splits["test"] = text_tokens(tok, args.data / "test.txt")
    prompt = tok.encode("Once upon a time")[:4]
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)

    def decode(model) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            n = len(generate_tokens(model, [prompt], greedy, eot_id=None)[0])
        return n / (time.perf_counter() - t0)

    for model in models.values():  # warm-up
        decode(model)
    names = list(runs)
    speed: dict[str, list[float]] = {row: [] for row in names}
    for r in range(args.rounds):
        for row in names if r % 2 == 0 else names[::-1]:
            speed[row].append(decode(models[row]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in speed.items()), file=sys.stderr)
    fp32_bytes = (runs["fp32"] / "last" / "model.safetensors").stat().st_size
    rows = {}
    for row, path in runs.items():
        size = (path / "last" / "model.safetensors").stat().st_size
        rows[row] = {"bytes": size, "size_vs_fp32": size / fp32_bytes, "tok_per_s": statistics.median(speed[row]),
                     "runs": [round(x, 1) for x in speed[row]]}
        for split, tokens in splits.items():
            rows[row][f"{split}_bpb"] = bpb(models[row], tokens, tok)
    for row in rows.values():
        for split in splits:
            row[f"{split}_bpb_vs_fp32"] = row[f"{split}_bpb"] / rows["fp32"][f"{split}_bpb"] - 1
    table = ["| weights | model.safetensors | vs fp32 | tokens/s |" + "".join(f" {s} bpb | vs fp32 |" for s in splits),
             "|---|---|---|---|" + "---|---|" * len(splits)]
    for row, r in rows.items():
        table.append(f"| {row} | {r['bytes'] / 1e6:.3f} MB | {r['size_vs_fp32']:.2f}x | {r['tok_per_s']:.0f} |"
                     + "".join(f" {r[f'{s}_bpb']:.4f} | {r[f'{s}_bpb_vs_fp32'] * 100:+.2f}% |" for s in splits))
    table += [f"| {row} | refused: {why} |" + " |" * (2 + 2 * len(splits)) for row, why in refused.items()]
    print("\n".join(table))
    model = models["fp32"]
    report = {**machine_info(), "model": name, "config": {k: v for k, v in vars(model.config).items()},
              "params": sum(p.numel() for p in model.parameters()), "step": load_run(args.run, which="last")[2].get("step"),
              "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows, "refused": refused, "table": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
