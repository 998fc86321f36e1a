"""Decoding speed: the uncached loop vs the KV cache vs the fast paths (CPU, or a GPU with --device cuda).

    python bench/decode.py                 # the table quoted in docs/generation.md
    python bench/decode.py --compile       # adds torch.compile of the decode step (slow to start)
    python bench/decode.py --quick         # fewer tokens and rounds
    python bench/decode.py --smoke         # seconds: stories260k, 16 tokens, 1 round, no onnxruntime, a tmp file
    python bench/decode.py --device cuda --dtype bfloat16 --out bench/results/decode_cuda.json
                                           # the same table on a GPU, in bf16 (issue #3)
    python bench/decode.py --models stories42m --prompt-len 400 --new-tokens 32 --batches --out x.json
                                           # NumPy vs PyTorch step over a long cache, a larger model

Batch 1, a 16-token prompt, 256 new tokens, greedy, no stopping (random weights: the values do
not change the speed), for the stories15m shape (vocab 4096) and stories260k (vocab 512, as in
llama2.c). Tokens per second include the prefill. Rows of a batch > 1 generate at most what fits
in the context (stories15m: 256 - 16 = 240 tokens; "new_tokens" in the JSON): past it, the window
slides, and its re-prefill of half the context for every row (``model.forward``, the same for
every row type) would take most of their time instead of the steps they measure. Rows: "uncached" re-runs the window every
token; "kv-cache" is ``model.forward`` with the cache one token at a time (``decode.ModuleDecoder``);
"step" is ``decode.StepDecoder``, the PyTorch step (the fast path in bf16 on the CPU); "numpy" is
``decode.CPUDecoder`` (the same math with the small operations in NumPy); "fast" is the default,
the registry's pick: ``decode.NativeDecoder`` for float32 on the CPU (the whole step in one C++
call; the NumPy decoder where slmkit's C++ library cannot be built), and on a GPU
``decode.GraphDecoder`` (the step replayed from a CUDA graph). "x numpy" is the median per-round
ratio to the NumPy decoder's batch-1 row. "weights MB/token" is what a step reads of the weight
matrices (the products and the head) divided by the rows of the batch, and "GB/s" that times the
tokens per second: the distance to the machine's memory bandwidth; "GFLOP/s" counts the products'
multiply-adds (2 per weight per row; attention left out): the distance to the matmul peak. On the
CPU in float32, "cpp-bf16" rows run ``decode.NativeBF16Decoder`` (the C++ step with bf16 weight
matrices: half the bytes) at batch 1 and every ``--batches`` size.
The "onnxruntime (KV cache)" row decodes the same model exported by ``slm export --format onnx``
(its KV-cache graph, greedy, batch 1); it is skipped without onnx/onnxruntime
(``pip install 'slmkit[export]'``). The machine may be shared, so every round runs
each variant once, alternating, and the table shows medians; "x uncached" is the median of the
per-round ratios to the uncached run of the same round. Writes bench/results/decode.json.
The "fast, int8 ..." / "fast, int4 ..." rows (float32 on the CPU; ``--no-quant`` leaves them out)
decode the same model quantized as ``slm quantize`` does (``quant.quantize_model``; "+ embeddings":
``--embeddings``, the head too): ``decode.NativeDecoder`` computes on the q8_0 / q4_0 blocks, and
"weights MB/token" counts the blocks' bytes. A preset whose sizes are not whole 32-value blocks
(stories260k's hidden 172) has no such rows. "fast, bf16 (--bits 16)" is ``slm quantize --bits 16``'s
model (every matrix rounded to bf16), which the default decoder reads as bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_name, machine_info  # noqa: E402

from slmkit import decode  # noqa: E402
from slmkit.config import from_dict, load_preset  # noqa: E402
from slmkit.generate import SamplingConfig, generate_tokens  # noqa: E402
from slmkit.errors import SlmError  # noqa: E402
from slmkit.model import GPT, ModelConfig  # noqa: E402
from slmkit.decode.native import storage_format  # noqa: E402
from slmkit.quant import QuantConfig, packed_weight, quantize_model  # noqa: E402

MODELS = {"stories15m": 4096, "stories260k": 512, "stories42m": 4096, "stories110m": 4096}  # preset -> vocab size
DEFAULT_MODELS = ["stories15m", "stories260k"]


def build(preset: str, vocab_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    section = dict(load_preset(preset)["model"], vocab_size=vocab_size)
    torch.manual_seed(0)
    return GPT(from_dict(ModelConfig, section, "model")).eval().to(device=device, dtype=dtype)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()


def batch_tokens(model, batch: int, prompt_len: int, new_tokens: int) -> int:
    """New tokens a row of ``batch`` generates: ``new_tokens``, or for a batch > 1 at most what fits
    in the context after the prompt (no slide of the window, see the module docstring)."""
    if batch == 1 or not isinstance(model, GPT):
        return new_tokens
    return max(1, min(new_tokens, model.config.block_size - prompt_len))


def timed(model: GPT, batch: int, prompt_len: int, new_tokens: int, path: str, cfg: SamplingConfig) -> float:
    """Tokens per second of one generation (all rows together); a batch > 1 stops at the context
    (``batch_tokens``)."""
    new_tokens = batch_tokens(model, batch, prompt_len, new_tokens)
    cfg = SamplingConfig(**{**cfg.__dict__, "max_new_tokens": new_tokens})
    if path == "onnxruntime":  # ``model`` is an OnnxGenerator here
        return timed_onnx(model, prompt_len, new_tokens)
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    sync = torch.cuda.synchronize if model.tok_emb.weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate_tokens(model, prompts, cfg, eot_id=None, path=path)
    sync()
    seconds = time.perf_counter() - t0
    assert all(len(o) == new_tokens for o in out)
    return batch * new_tokens / seconds


def onnx_generator(model: GPT, threads: int):
    """The model exported to ONNX and loaded in onnxruntime, or None without the export extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime row skipped: pip install 'slmkit[export]'", file=sys.stderr)
        return None
    import shutil
    import tempfile

    from slmkit.export import OnnxGenerator, export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="slm-bench-onnx-"))
    try:
        export_onnx(model, None, tmp / "onnx")
        return OnnxGenerator(tmp / "onnx", threads=threads)  # the session holds the graph in memory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def timed_onnx(gen, prompt_len: int, new_tokens: int) -> float:
    """Tokens per second of one greedy generation with onnxruntime (batch 1, prefill included)."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, gen.meta["vocab_size"], (prompt_len,), generator=g).tolist()
    t0 = time.perf_counter()
    out = gen.generate(prompt, new_tokens, stop_at_eot=False)
    seconds = time.perf_counter() - t0
    assert len(out) == new_tokens
    return new_tokens / seconds


class CompiledStep(decode.StepDecoder):
    """The PyTorch step under torch.compile (dynamic shapes: the cache length grows every step),
    registered as the backend "step+compile" (after "cached", so never picked for "fast")."""

    name = "step+compile"
    step = torch.compile(decode.StepDecoder.step, dynamic=True)


def compiled_step(model: GPT) -> float:
    """Register ``CompiledStep``; returns the time of its first generation (the compilation)."""
    decode.BACKENDS[CompiledStep.name] = CompiledStep
    t0 = time.perf_counter()
    generate_tokens(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=0, stop_at_eot=False),
                    path=CompiledStep.name)
    return time.perf_counter() - t0


def write_report(results: list[dict], args: argparse.Namespace) -> None:
    """Print the table and write the JSON (after every model, so that a run cut short keeps what it measured)."""
    table = ["| model | row | batch | tokens/s (median) | x uncached | x numpy | weights MB/token | GB/s | GFLOP/s | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        numpy = f"{r['x_numpy']:.2f}" if r.get("x_numpy") is not None else "-"
        table.append(f"| {r['model']} | {r['row']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['x_uncached']:.1f} | "
                     f"{numpy} | {r['weight_bytes_per_token'] / 1e6:.2f} | {r['weight_gb_per_s']:.1f} | "
                     f"{r.get('gflop_per_s', 0):.1f} | "
                     + " ".join(f"{x:.0f}" for x in r["runs"]) + " |")
    print("\n".join(table))
    report = {
        **machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(args.device), "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")
                if k in os.environ},
        "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "results": results, "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def weight_bytes(model: GPT, path: str = "fast") -> int:
    """Bytes of the weight matrices one decode step reads: every linear layer and the head (as
    stored by the path: half for the bf16 matrices of "cpp-bf16")."""
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    size = 2 if path == "cpp-bf16" else None
    return sum(m.weight.numel() * (size or m.weight.element_size()) for m in linears)


def matrix_flops(model: GPT) -> int:
    """Floating-point operations of the products of one token: a multiply and an add per weight."""
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    return 2 * sum(m.weight.numel() for m in linears)


QUANT_ROWS = {"bf16 (--bits 16)": QuantConfig(16), "int8 q8_0": QuantConfig(8, 32), "int8 q8_0 + embeddings": QuantConfig(8, 32, embeddings=True),
              "int4 q4_0 + embeddings": QuantConfig(4, 32, embeddings=True)}


def packed_bytes(model: GPT) -> int:
    """Bytes of weights a step reads when the linear layers (and head) are read as their blocks,
    or as bf16 where every matrix holds bf16 values (``decode.native.storage_format``)."""
    linears = [model.lm_head] + [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
    head_blocks = packed_weight(model.tok_emb) if model.lm_head.weight is model.tok_emb.weight else None
    size = 2 if storage_format(model) == "bf16" else None
    total = 0
    for m in linears:
        p = packed_weight(m) or (head_blocks if m is model.lm_head else None)
        total += p.blocks.numel() if p is not None else m.weight.numel() * (size or m.weight.element_size())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU table")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (30-60 s to compile)")
    parser.add_argument("--one-thread-rows", action="store_true", help="add the fast rows with 1 thread")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, 2 rounds: a smoke run")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime row")
    parser.add_argument("--no-quant", action="store_true", help="leave out the int8/int4 rows")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k, 16 new tokens, batch 1 and 2, "
                        "1 round, no onnxruntime, written to a temporary file (not bench/results)")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/decode.json)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 64, 2
    if args.smoke:
        args.models, args.new_tokens, args.rounds, args.batches, args.no_onnx = ["stories260k"], 16, 1, [2], True
        if args.out is None:
            import tempfile

            args.out = str(Path(tempfile.mkdtemp(prefix="slm-decode-smoke-")) / "decode.json")
    args.out = args.out or str(Path(__file__).parent / "results" / "decode.json")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    sampled = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eot=False, seed=0)  # the defaults
    results = []
    for name in args.models:
        model = build(name, MODELS[name], args.device, dtype)
        # (row label, batch, path, sampling config, model, threads)
        t = args.threads
        fast = decode.pick(model).__name__  # what "fast" runs here
        variants = [("uncached", 1, "uncached", greedy, model, t), ("kv-cache", 1, "cached", greedy, model, t),
                    ("step (StepDecoder)", 1, "step", greedy, model, t),
                    *([("numpy (CPUDecoder)", 1, "numpy", greedy, model, t)] if decode.CPUDecoder.supports(
                        model, *decode.placement(model)) else []),
                    (f"fast (default: {fast})", 1, "fast", greedy, model, t),
                    ("fast + sampling (T=0.8, top-k 200, top-p 0.95)", 1, "fast", sampled, model, t)]
        compile_s = None
        if args.compile:
            try:
                compile_s = compiled_step(model)
                variants.append(("step + torch.compile", 1, CompiledStep.name, greedy, model, t))
            except Exception as e:  # noqa: BLE001 - a failed compile is a result too
                print(f"torch.compile failed: {type(e).__name__}: {e}", file=sys.stderr)
        gen = (onnx_generator(model, t) if args.device == "cpu" and dtype == torch.float32 and not args.no_onnx
               else None)
        if gen is not None:
            variants.append(("onnxruntime (KV cache)", 1, "onnxruntime", greedy, gen, t))
        bf16 = decode.NativeBF16Decoder.supports(model, *decode.placement(model))
        if bf16:
            variants.append(("cpp-bf16 (NativeBF16Decoder)", 1, "cpp-bf16", greedy, model, t))
        for b in args.batches:
            variants += [(f"step, batch {b}", b, "step", greedy, model, t), (f"fast, batch {b}", b, "fast", greedy, model, t)]
            if bf16:
                variants.append((f"cpp-bf16, batch {b}", b, "cpp-bf16", greedy, model, t))
        quant_bytes: dict[str, int] = {}  # row -> bytes of blocks and float weights a step reads
        for qname, qcfg in QUANT_ROWS.items() if args.device == "cpu" and dtype == torch.float32 and not args.no_quant else []:
            qmodel = build(name, MODELS[name])
            try:
                quantize_model(qmodel, qcfg)
            except SlmError as e:
                print(f"{name}: no {qname} row: {e}", file=sys.stderr)
                continue
            qbatches = [1] + args.batches[-1:] if qname == "int8 q8_0 + embeddings" else [1]
            for b in qbatches:
                label = f"fast, {qname}" + (f", batch {b}" if b > 1 else "")
                variants.append((label, b, "fast", greedy, qmodel, t))
                quant_bytes[label] = packed_bytes(qmodel)
        if args.one_thread_rows and t != 1:
            variants += [(f"fast, batch {b}, 1 thread", b, "fast", greedy, model, 1) for b in [1, *args.batches]]
        for _, batch, path, cfg, m, threads in variants:  # warm-up: allocator, kernels, caches
            torch.set_num_threads(threads)
            timed(m, batch, args.prompt_len, 8, path, SamplingConfig(**{**cfg.__dict__, "max_new_tokens": 8}))
        runs: dict[str, list[float]] = {v[0]: [] for v in variants}
        for r in range(args.rounds):
            for label, batch, path, cfg, m, threads in variants:
                torch.set_num_threads(threads)
                runs[label].append(timed(m, batch, args.prompt_len, args.new_tokens, path, cfg))
            torch.set_num_threads(t)
            print(f"{name} round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), file=sys.stderr)
        base = runs["uncached"]
        numpy_runs = runs.get("numpy (CPUDecoder)")
        flops = matrix_flops(model)
        for label, batch, path, cfg, _, threads in variants:
            wbytes = weight_bytes(model, path)
            results.append({
                "model": name, "vocab_size": MODELS[name], "params": sum(p.numel() for p in model.parameters()),
                "row": label, "batch": batch, "path": path, "threads": threads, "greedy": cfg.temperature == 0,
                "new_tokens": batch_tokens(model, batch, args.prompt_len, args.new_tokens),
                "tokens_per_s": round(statistics.median(runs[label]), 1),
                "runs": [round(x, 1) for x in runs[label]],
                "x_uncached": round(statistics.median(a / b for a, b in zip(runs[label], base)), 1),
                "x_numpy": (round(statistics.median(a / b for a, b in zip(runs[label], numpy_runs)), 2)
                            if numpy_runs else None),
                "weight_bytes_per_token": quant_bytes.get(label, wbytes) / batch,
                "weight_gb_per_s": round(statistics.median(runs[label]) * quant_bytes.get(label, wbytes) / batch / 1e9, 2),
                "gflop_per_s": round(statistics.median(runs[label]) * flops / 1e9, 2),
                **({"compile_s": round(compile_s, 1)} if "compile" in label else {}),
            })
        write_report(results, args)


if __name__ == "__main__":
    main()
