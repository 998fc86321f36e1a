"""Size, decoding speed and bits per byte of every export, fp32 against int8, in one process.

    python bench/export_int8.py --run RUN_DIR --data DATA_DIR     # a trained run: size, speed, val (and test) bpb
    python bench/export_int8.py --random stories15m               # random weights: size and speed only
    python bench/export_int8.py --smoke                           # seconds: the tiny preset, a tmp dir

The model is exported with ``slm export``'s code (``slmkit.export.export_model``) as onnx and
torchscript, each in fp32 and with ``--quantize int8``, and PyTorch's own dynamic int8
(``quantize_int8``) is added. Rows:

* PyTorch fp32 on the default fast path and on the ``cached`` path (``slm generate``);
* PyTorch int8 on the ``cached`` path (the fast paths read ``Linear.weight``, which a dynamically
  quantized layer lacks, so generation falls back to it);
* onnxruntime fp32 and int8 with the KV-cache graph (``model_kv.onnx``, ``OnnxGenerator``);
* TorchScript fp32 and int8 (``model.pt``, no cache: the whole window every token).

Decoding is greedy, batch 1, a 4-token prompt, ``--new-tokens`` (200) new tokens, no stopping, the
rows alternating for ``--rounds`` rounds (medians; "x fast path" is the median of per-round ratios to
PyTorch's fast path). Sizes are the bytes of the one file each runtime loads. Bits per byte are
scored as ``slm eval`` does (text targets over their bytes) through each runtime's full-sequence model on DATA's val
split (and DATA/test.txt when ``bench/quality.py`` made DATA). Writes
bench/results/export_int8_<name>.json (``--out``) with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402
from slmkit.config import from_dict, load_preset  # noqa: E402
from slmkit.export import OnnxGenerator, export_model, file_sizes, quantize_int8  # noqa: E402
from slmkit.generate import SamplingConfig, generate_tokens  # noqa: E402
from slmkit.model import GPT, ModelConfig  # noqa: E402

ROWS = ["pytorch fp32, fast path", "pytorch fp32, cached path", "pytorch int8, cached path",
        "onnxruntime fp32 (model_kv.onnx)", "onnxruntime int8 (model_kv.onnx)",
        "torchscript fp32 (no cache)", "torchscript int8 (no cache)"]


class Logits:
    """What ``evaluate_tokens`` needs of a model (``.config``, ``.eval()``, ``model(x) -> (logits, _)``)
    around a runtime's full-sequence call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], config: ModelConfig) -> None:
        self.fn, self.config = fn, config

    def eval(self) -> Logits:
        return self

    def __call__(self, x: torch.Tensor, *_: object) -> tuple[torch.Tensor, None]:
        return self.fn(x), None


def text_tokens(tokenizer, path: Path) -> np.ndarray:
    """``path``'s documents as slm eval --input tokenizes them."""
    from slmkit.prepare import read_documents

    docs = list(read_documents([str(path)]))
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype=np.int64)


def bpb(model, tokens: np.ndarray, tokenizer) -> float:
    """Bits per byte as slm eval counts them (text targets over their bytes)."""
    from slmkit.evaluate import evaluate_tokens

    return evaluate_tokens(model, tokens, tokenizer.token_byte_lengths())["bpb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained RUN_DIR (its last checkpoint)")
    parser.add_argument("--data", type=Path, help="the run's DATA_DIR: bpb on its val split (and test.txt)")
    parser.add_argument("--random", metavar="PRESET", help="random weights of a preset's shape (vocab --vocab)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/export_int8_<name>.json)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, random weights, 8 tokens, 1 round, a tmp dir")
    args = parser.parse_args()
    if args.smoke:
        args.random, args.vocab, args.rounds, args.new_tokens = "tiny", 256, 1, 8
    if (args.run is None) == (args.random is None):
        raise SystemExit("error: pass --run RUN_DIR --data DATA_DIR (a trained model) or --random PRESET")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="slm-export-bench-"))
    if args.run is not None:
        from slmkit.checkpoint import load_run

        model, tok, info = load_run(args.run, which="last")
        prompt = tok.encode("Once upon a time")[:4]
        name, step = args.run.name, info.get("step")
        ckpt_bytes = (args.run / "last" / "model.safetensors").stat().st_size
    else:
        torch.manual_seed(0)
        section = dict(load_preset(args.random)["model"], vocab_size=args.vocab)
        model = GPT(from_dict(ModelConfig, section, "model")).eval()
        tok, prompt, name, step = None, [1, 2, 3, 4], f"random_{args.random}", None
        from safetensors.torch import save_file
        from slmkit.checkpoint import model_state

        save_file(model_state(model), work / "model.safetensors")
        ckpt_bytes = (work / "model.safetensors").stat().st_size
    out = Path(args.out) if args.out else (work / "export_int8.json" if args.smoke
                                           else ROOT / "bench" / "results" / f"export_int8_{name}.json")

    paths = {}
    for fmt, q in [("onnx", None), ("onnx", "int8"), ("torchscript", None), ("torchscript", "int8")]:
        paths[fmt + ("-int8" if q else "")] = export_model(model, tok, fmt, work / (fmt + ("-int8" if q else "")), quantize=q)
    q8 = quantize_int8(model)
    g32, g8 = (OnnxGenerator(paths[n], threads=args.threads) for n in ("onnx", "onnx-int8"))
    j32, j8 = (torch.jit.load(str(paths[n] / "model.pt")) for n in ("torchscript", "torchscript-int8"))
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    T = model.config.block_size

    def torch_decode(m, path: str) -> int:
        with torch.inference_mode():
            return len(generate_tokens(m, [prompt], greedy, eot_id=None, path=path)[0])

    def jit_decode(m) -> int:  # no cache: the whole window again for every token
        seq = list(prompt)
        with torch.inference_mode():
            for _ in range(args.new_tokens):
                seq.append(int(m(torch.tensor([seq[-T:]]))[0, -1].argmax()))
        return args.new_tokens

    decode = dict(zip(ROWS, [
        lambda: torch_decode(model, "fast"), lambda: torch_decode(model, "cached"), lambda: torch_decode(q8, "cached"),
        lambda: len(g32.generate(prompt, args.new_tokens, stop_at_eot=False)),
        lambda: len(g8.generate(prompt, args.new_tokens, stop_at_eot=False)),
        lambda: jit_decode(j32), lambda: jit_decode(j8)]))
    for fn in decode.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {k: [] for k in ROWS}
    for r in range(args.rounds):
        for k in ROWS if r % 2 == 0 else ROWS[::-1]:
            t0 = time.perf_counter()
            n = decode[k]()
            runs[k].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), file=sys.stderr)
    size = dict(zip(ROWS, [ckpt_bytes, ckpt_bytes, file_sizes(paths["torchscript-int8"])["model.pt"],
                           file_sizes(paths["onnx"])["model_kv.onnx"], file_sizes(paths["onnx-int8"])["model_kv.onnx"],
                           file_sizes(paths["torchscript"])["model.pt"], file_sizes(paths["torchscript-int8"])["model.pt"]]))
    scorers = {
        "pytorch fp32, fast path": model, "pytorch int8, cached path": q8,
        "onnxruntime fp32 (model_kv.onnx)": Logits(lambda x: torch.from_numpy(g32.logits(x.numpy())), model.config),
        "onnxruntime int8 (model_kv.onnx)": Logits(lambda x: torch.from_numpy(g8.logits(x.numpy())), model.config),
        "torchscript fp32 (no cache)": Logits(j32, model.config), "torchscript int8 (no cache)": Logits(j8, model.config),
    }
    splits: dict[str, np.ndarray] = {}
    if args.data is not None:
        from slmkit.data import open_split

        splits["val"] = np.asarray(open_split(args.data, "val"), dtype=np.int64)
        if (args.data / "test.txt").exists():
            splits["test"] = text_tokens(tok, args.data / "test.txt")
    fast = runs["pytorch fp32, fast path"]
    rows = {}
    for k in ROWS:
        rows[k] = {"bytes": size[k], "size_vs_fp32": size[k] / ckpt_bytes,
                   "tok_per_s": statistics.median(runs[k]), "runs": [round(x, 1) for x in runs[k]],
                   "x_fast_path": statistics.median(a / b for a, b in zip(runs[k], fast))}
        for split, tokens in splits.items():
            if k in scorers:
                rows[k][f"{split}_bpb"] = bpb(scorers[k], tokens, tok)
    table = ["| runtime | file size | vs fp32 file | tokens/s | x fast path |"
             + "".join(f" {s} bpb |" for s in splits), "|---|---|---|---|---|" + "---|" * len(splits)]
    for k, r in rows.items():
        table.append(f"| {k} | {r['bytes'] / 1e6:.2f} MB | {r['size_vs_fp32']:.2f}x | {r['tok_per_s']:.0f} | "
                     f"{r['x_fast_path']:.2f}x |" + "".join(f" {r[f'{s}_bpb']:.5f} |" if f"{s}_bpb" in r else " |"
                                                        for s in splits))
    print("\n".join(table))
    report = {**machine_info(), "model": name, "step": step, "params": sum(p.numel() for p in model.parameters()),
              "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "onnxruntime": __import__("onnxruntime").__version__, "rows": rows, "table": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
