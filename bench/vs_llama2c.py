"""slmkit's decoding against llama2.c's C program (``run.c``), on the same machine and the same model.

    python bench/vs_llama2c.py --llama2c PATH/TO/llama2.c      # a clone of github.com/karpathy/llama2.c
    python bench/vs_llama2c.py --llama2c PATH --vocab 32000    # the published stories15M shape

Issue #3 quotes llama2.c's ``run.c`` (fp32) at about 110 tokens/s for the stories15M shape on an
M1 laptop, and asks slmkit to beat that C program on the same machine, from Python. This script
measures both here, on one model:

* a random stories15m-shape model (dim 288, 6 layers, 6 heads, context 256, vocab 4096, or
  ``--vocab 32000`` as the published stories15M checkpoint and its tokenizer.bin have; untied
  head whose row for token 1 is zero, so that greedy decoding never picks token 1, on which run.c
  stops) is written in llama2.c's checkpoint format by slmkit's export (``slmkit.export.llama2c``,
  version 0: the query and key rows permuted to llama2.c's interleaved rotary layout; the ids
  are kept, not mapped onto llama2.c's vocabulary layout), with a stand-in ``tokenizer.bin``;
* ``run.c`` is compiled as llama2.c's Makefile does, ``make runomp`` (``gcc -Ofast -fopenmp
  -march=native``, run with 2 OpenMP threads) and ``make run`` (``gcc -O3``, one thread), and run
  greedily from its start token for the whole context (``-t 0 -n 256``); it reports tokens/s from
  its second step on;
* slmkit generates greedily from the same start token, 255 tokens (the same 256 positions), on
  its default fast path with 2 threads (``decode.NativeDecoder``, the C++ step, where slmkit's
  library builds), timed from the first new token as run.c is; the NumPy decoder
  (``decode.CPUDecoder``, the fast path before the C++ one) is shown beside it, and the C++ step
  with its weight matrices in bf16 (``decode.NativeBF16Decoder``: half the bytes per token; its
  greedy tokens are those of the model with bf16-rounded weights, so they part from run.c's).

The runs alternate, round after round, and the table gives medians. The headline ratio is the
like-for-like build: slmkit against ``make runomp`` with the same 2 threads (``headline`` in the
JSON); the single-threaded ``-O3`` build is shown beside it. The greedy tokens of the two
programs are compared too (fp32 in both, so they agree until rounding first flips a near tie).
Writes bench/results/vs_llama2c.json with the machine it ran on. ``--smoke`` decodes 32 positions
once, into a temporary file, in seconds.

bf16, int8 and int4 (issue 19; ``--no-quant`` leaves them out): "slmkit bf16" is the model as
``slm quantize --bits 16`` stores it (every matrix rounded to bf16), on the default fast path, which
reads it as bf16 (with AVX512-BF16's products where the CPU has them: ``decode.native``). For
int8/int4: where the clone has ``runq.c``, it is built with runomp's flags and run, 2 OpenMP threads, on the same model exported as version 2
(``write_model_bin(version=2)``: int8 in groups of 32 with float scales, the embedding and head
too, activations quantized by the same groups); slmkit decodes the same model quantized by
``slm quantize``'s blocks with ``--embeddings`` (``quant.quantize_model``: q8_0, and q4_0), on the
C++ step's integer products. ``headline_int8`` is slmkit int8 against ``runq.c``, ``headline_best``
slmkit's fastest row against run.c runomp. The two int8 programs round differently (float16 vs
float32 scales), so their tokens are not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
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

from slmkit import decode  # noqa: E402
from slmkit.config import from_dict, load_preset  # noqa: E402
from slmkit.export.llama2c import write_model_bin  # noqa: E402
from slmkit.generate import Generation, SamplingConfig  # noqa: E402
from slmkit.model import GPT, ModelConfig  # noqa: E402
from slmkit.quant import QuantConfig, quantize_model  # noqa: E402

BUILDS = {"runomp": ["-Ofast", "-fopenmp", "-march=native"], "run": ["-O3"]}  # llama2.c's Makefile


def llama2c_model(vocab_size: int = 4096) -> GPT:
    """The stories15m shape with an untied head whose row for token 1 (run.c's stop token) is 0."""
    section = dict(load_preset("stories15m")["model"], vocab_size=vocab_size, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(from_dict(ModelConfig, section, "model")).eval()
    with torch.no_grad():
        model.lm_head.weight[1] = 0.0
    return model


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A stand-in ``tokenizer.bin``: token i prints as "[i]", so run.c's output gives the ids back."""
    pieces = [f"[{i}]".encode() for i in range(vocab_size)]
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(len(p) for p in pieces)))
        for p in pieces:
            f.write(struct.pack("fi", 0.0, len(p)) + p)


def build(llama2c: Path, out: Path) -> dict[str, Path]:
    src = llama2c / "run.c"
    if not src.is_file():
        raise SystemExit(f"error: {src} not found: --llama2c takes a clone of github.com/karpathy/llama2.c")
    compiler = os.environ.get("CC", "gcc")
    if not shutil.which(compiler):
        raise SystemExit(f"error: no C compiler ({compiler}) on PATH: install gcc or set CC")
    exes = {}
    for name, flags in BUILDS.items():
        exes[name] = out / name
        subprocess.run([compiler, *flags, str(src), "-lm", "-o", str(exes[name])], check=True)
    return exes


QUANT = {"bf16": QuantConfig(16), "int8": QuantConfig(8, 32, embeddings=True), "int4": QuantConfig(4, 32, embeddings=True)}


def build_runq(llama2c: Path, out: Path) -> Path | None:
    """runq.c built with runomp's flags, or None where the clone has no runq.c."""
    src = llama2c / "runq.c"
    if not src.is_file():
        return None
    subprocess.run([os.environ.get("CC", "gcc"), *BUILDS["runomp"], str(src), "-lm", "-o", str(out / "runq")], check=True)
    return out / "runq"


def run_c(exe: Path, model: Path, tokenizer: Path, threads: int, steps: int) -> tuple[float, list[int]]:
    """run.c's reported tokens/s and the ids it printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [str(exe), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps), "-s", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    rate = re.search(r"achieved tok/s: ([0-9.]+)", done.stderr)
    if rate is None:
        raise RuntimeError(f"run.c printed no speed: {done.stderr[-500:]}")
    return float(rate.group(1)), [int(i) for i in re.findall(r"\[(\d+)\]", done.stdout)]


def run_slmkit(model: GPT, steps: int, path: str = "fast") -> tuple[float, list[int]]:
    """Tokens/s of slmkit's greedy ``path`` from token 1 over ``steps`` positions, and the ids.
    Like run.c, the clock starts after the first step (its first forward and pick)."""
    gen = Generation(model, [[1]], SamplingConfig(max_new_tokens=steps - 1, temperature=0.0, stop_at_eot=False),
                     path=path)
    gen.step()
    t0, n = time.perf_counter(), 0
    while not gen.finished:
        gen.step()
        n += 1
    return n / (time.perf_counter() - t0), gen.tokens[0]


def quant_headlines(rows: dict[str, list[float]]) -> dict[str, dict]:
    """slmkit int8 vs runq.c, and slmkit's fastest row vs run.c runomp (medians of per-round ratios)."""
    out = {}
    omp = rows["run.c, make runomp (2 threads)"]
    ours = {k: v for k, v in rows.items() if k.startswith("slmkit") and "numpy" not in k}
    best = max(ours, key=lambda k: statistics.median(ours[k]))
    out["headline_best"] = {"what": f"slmkit's fastest row ({best}) vs run.c make runomp, both 2 threads",
                            "row": best, "ratio": statistics.median(a / b for a, b in zip(ours[best], omp))}
    q8, runq = rows.get("slmkit int8 (fast path, 2 threads)"), rows.get("runq.c int8, runomp flags (2 threads)")
    if q8 and runq:
        out["headline_int8"] = {"what": "slmkit int8 (q8_0, embeddings too) vs runq.c (int8, groups of 32), both 2 threads",
                                "ratio": statistics.median(a / b for a, b in zip(q8, runq)),
                                "slmkit_tok_per_s": statistics.median(q8), "runq_tok_per_s": statistics.median(runq)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama2c", type=Path, required=True, help="a clone of github.com/karpathy/llama2.c")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (32000: the published stories15M)")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/vs_llama2c.json)")
    parser.add_argument("--smoke", action="store_true", help="32 positions, 1 round, a temporary file: seconds")
    parser.add_argument("--no-quant", action="store_true", help="leave out the int8/int4 rows (runq.c and slmkit's)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="slm-llama2c-smoke-")) / "vs_llama2c.json")
    args.out = args.out or str(ROOT / "bench" / "results" / "vs_llama2c.json")
    torch.set_num_threads(args.threads)
    model = llama2c_model(args.vocab)
    steps = 32 if args.smoke else model.config.block_size
    numpy_row = f"slmkit (numpy path, {args.threads} threads)"
    bf16_row = f"slmkit (C++ step, bf16 weights, {args.threads} threads)" if decode.NativeBF16Decoder.supports(model) else None
    rows: dict[str, list[float]] = {"slmkit (fast path, 2 threads)": [], **({bf16_row: []} if bf16_row else {}), numpy_row: [],
                                    "run.c, make runomp (2 threads)": [], "run.c, make run (1 thread)": []}
    with tempfile.TemporaryDirectory(prefix="slm-llama2c-") as tmp:
        tmp = Path(tmp)
        write_model_bin(model, tmp / "model.bin")  # slmkit's llama2.c export; ids kept as they are
        write_tokenizer(tmp / "tokenizer.bin", model.config.vocab_size)
        exes = build(args.llama2c.expanduser(), tmp)
        quantized: dict[str, GPT] = {}
        runq = None if args.no_quant else build_runq(args.llama2c.expanduser(), tmp)
        if not args.no_quant:
            for qname, qcfg in QUANT.items():
                quantized[qname] = llama2c_model(args.vocab)
                quantize_model(quantized[qname], qcfg)
                rows[f"slmkit {qname} (fast path, 2 threads)"] = []
                run_slmkit(quantized[qname], steps)  # warm-up
        if runq is not None:
            write_model_bin(model, tmp / "model_q80.bin", version=2)
            rows["runq.c int8, runomp flags (2 threads)"] = []
            run_c(runq, tmp / "model_q80.bin", tmp / "tokenizer.bin", args.threads, steps)
        _, ours = run_slmkit(model, steps)  # warm-up
        _, theirs = run_c(exes["runomp"], tmp / "model.bin", tmp / "tokenizer.bin", args.threads, steps)
        for r in range(args.rounds):
            rows["slmkit (fast path, 2 threads)"].append(run_slmkit(model, steps)[0])
            if bf16_row:
                rows[bf16_row].append(run_slmkit(model, steps, "cpp-bf16")[0])
            rows[numpy_row].append(run_slmkit(model, steps, "numpy")[0])
            rows["run.c, make runomp (2 threads)"].append(
                run_c(exes["runomp"], tmp / "model.bin", tmp / "tokenizer.bin", args.threads, steps)[0])
            rows["run.c, make run (1 thread)"].append(
                run_c(exes["run"], tmp / "model.bin", tmp / "tokenizer.bin", 1, steps)[0])
            for qname, qmodel in quantized.items():
                rows[f"slmkit {qname} (fast path, 2 threads)"].append(run_slmkit(qmodel, steps)[0])
            if runq is not None:
                rows["runq.c int8, runomp flags (2 threads)"].append(
                    run_c(runq, tmp / "model_q80.bin", tmp / "tokenizer.bin", args.threads, steps)[0])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()),
                  file=sys.stderr)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    base = rows["run.c, make runomp (2 threads)"]
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    wbytes = sum(4 * m.weight.numel() for m in linears)  # fp32 weight matrices read per token
    flops = wbytes // 2  # a multiply and an add per fp32 weight (4 bytes)
    values = wbytes // 4  # int8 / int4 rows: blocks of 32 with a float16 (slmkit) or float32 (runq.c) scale
    row_bytes = {"slmkit bf16 (fast path, 2 threads)": wbytes // 2,
                 "slmkit int8 (fast path, 2 threads)": values * 34 // 32, "slmkit int4 (fast path, 2 threads)": values * 18 // 32,
                 "runq.c int8, runomp flags (2 threads)": values * 36 // 32}
    if bf16_row:
        row_bytes[bf16_row] = wbytes // 2
    table = ["| program | tokens/s (median) | vs run.c runomp | weights MB/token | weights GB/s | GFLOP/s | runs |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        ratio = statistics.median(a / b for a, b in zip(runs, base))
        nbytes = row_bytes.get(name, wbytes)
        table.append(f"| {name} | {statistics.median(runs):.0f} | {ratio:.2f}x | {nbytes / 1e6:.1f} | "
                     f"{statistics.median(runs) * nbytes / 1e9:.1f} | {statistics.median(runs) * flops / 1e9:.1f} | "
                     + " ".join(f"{x:.0f}" for x in runs) + " |")
    table.append("")
    table.append(f"Vocabulary {model.config.vocab_size}. Weights read per token: {wbytes / 1e6:.1f} MB (fp32 matrices "
                 f"of the layers and the head; half in bf16; int8 {values * 34 / 32e6:.1f} MB, int4 "
                 f"{values * 18 / 32e6:.1f} MB, runq.c {values * 36 / 32e6:.1f} MB); "
                 f"slmkit's fast path here: {decode.pick(model).__name__}.")
    print("\n".join(table))
    print(f"greedy tokens: the first {agree} of {min(len(ours), len(theirs))} compared agree", file=sys.stderr)
    slm, omp = rows["slmkit (fast path, 2 threads)"], rows["run.c, make runomp (2 threads)"]
    report = {
        **machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "numpy": np.__version__, "threads": args.threads, "positions": steps, "vocab_size": model.config.vocab_size,
        "fast_decoder": decode.pick(model).__name__, "weight_bytes_per_token": wbytes,
        "headline": {"what": "slmkit's fast path vs run.c make runomp, both 2 threads (median of per-round ratios)",
                     "ratio": statistics.median(a / b for a, b in zip(slm, omp)),
                     "slmkit_tok_per_s": statistics.median(slm), "runomp_tok_per_s": statistics.median(omp)},
        **({"bf16": {"what": "slmkit's C++ step with bf16 weight matrices vs run.c make runomp (median of per-round ratios)",
                     "ratio": statistics.median(a / b for a, b in zip(rows[bf16_row], omp)),
                     "tok_per_s": statistics.median(rows[bf16_row])}} if bf16_row else {}),
        **quant_headlines(rows),
        "builds": {k: " ".join(v) for k, v in BUILDS.items()},
        "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rows.items()},
        "greedy_tokens_agree": agree, "tokens_compared": min(len(ours), len(theirs)), "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
