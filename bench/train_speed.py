"""Training throughput: slmkit's training step against a plain eager reference, in the same process.

    python bench/train_speed.py                                  # CPU, 2 threads, fp32
    python bench/train_speed.py --device cuda --preset-shape    # GPU, bf16: 15m, 42m, 110m at their own shapes

One training step is forward + backward + gradient clipping + optimizer step on a fixed batch
(16 x 256 tokens by default, vocab 4096; ``--preset-shape`` takes each preset's own micro-batch and
context instead, e.g. 32 x 1024 for stories110m, the size a GPU is used at). Three ways of doing it
are timed:

* ``reference``: the same architecture written the nanoGPT / llama2.c way, below in this file:
  eager PyTorch, separate q/k/v and w1/w2/w3 matmuls, hand-written RMSNorm and RoPE, SDPA, the full
  logits and F.cross_entropy, AdamW (foreach, as nanoGPT uses off CUDA), no compile;
* ``slmkit-eager``: slmkit's model and optimizer as ``Trainer.train_step`` uses them, uncompiled;
* ``slmkit``: the same with ``train.compile=true``: slmkit's fastest path;
* ``slmkit-blocks`` (only when asked for): compile just the repeated block, which compiles faster.

The machine may be shared, so the variants run in alternation (a few steps of each, round after
round), every round also times a large square matmul, and the table shows medians; ratios between
variants of the same round survive a noisy machine better than absolute numbers. MFU is
``flops_per_token x tokens/s`` (6 x params plus the attention term) over the median matmul peak.
The result goes to bench/results/train_speed_<device>.json with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmkit.config import load_preset  # noqa: E402
from slmkit.model import GPT, ModelConfig  # noqa: E402
from slmkit.train import TrainConfig, autocast, make_optimizer, measure_matmul_peak  # noqa: E402

# --------------------------------------------------------------------------- the eager reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, length: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama2.c's apply_rotary_emb: (B, T, H, D) rotated in interleaved pairs."""
    xr, xi = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    c, s = cos.view(1, x.shape[1], 1, -1), sin.view(1, x.shape[1], 1, -1)
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3).type_as(x)


class RefAttention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.n_head, c.kv_heads, c.head_dim
        self.wq = nn.Linear(c.n_embd, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(c.n_embd, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(c.n_embd, self.nkv * self.hd, bias=False)
        self.wo = nn.Linear(self.nh * self.hd, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.nh, self.hd), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.nkv, self.hd), cos, sin)
        v = self.wv(x).view(B, T, self.nkv, self.hd)
        if self.nkv != self.nh:
            k = k.repeat_interleave(self.nh // self.nkv, dim=2)
            v = v.repeat_interleave(self.nh // self.nkv, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))


class RefFeedForward(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(c.n_embd, c.hidden_dim, bias=False)
        self.w2 = nn.Linear(c.hidden_dim, c.n_embd, bias=False)
        self.w3 = nn.Linear(c.n_embd, c.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(c.n_embd), RefAttention(c)
        self.ffn_norm, self.feed_forward = RMSNorm(c.n_embd), RefFeedForward(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class RefGPT(nn.Module):
    """Llama-style GPT (RMSNorm, RoPE, SwiGLU, GQA, tied embeddings) in llama2.c's model.py style."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(RefBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd)
        self.output = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight
        cos, sin = rope_tables(c.head_dim, c.block_size)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = idx.shape[1]
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, self.freqs_cos[:T], self.freqs_sin[:T])
        logits = self.output(self.norm(h))
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# --------------------------------------------------------------------------- the steps


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(variant: str, mc: ModelConfig, device: str, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[Callable[[], None], float]:
    """A function running one training step of ``variant``, and the seconds its first two steps took
    (compilation included)."""
    torch.manual_seed(0)
    if variant == "reference":
        model = RefGPT(mc).to(device)
        fused = device == "cuda"  # nanoGPT: fused AdamW on CUDA only
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
        forward = lambda: model(x, y)[1]  # noqa: E731
    else:
        model = GPT(mc).to(device)
        cfg = TrainConfig(lr=1e-4, compile=variant == "slmkit")
        opt = make_optimizer(model, cfg, device)
        net = torch.compile(model) if cfg.compile else model
        if variant == "slmkit-blocks":
            for block in model.blocks:
                block.compile()
        forward = lambda: net(x, y, return_logits=False)[1]  # noqa: E731

    def step() -> None:
        with autocast(device, dtype):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    step()
    sync(device)
    return step, time.perf_counter() - t0


def bench_preset(preset: str, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    sections = load_preset(preset)
    batch, block = args.batch, args.block
    if args.preset_shape:
        batch, block = sections["train"]["batch_size"], sections["model"]["block_size"]
    mc = ModelConfig(**{**sections["model"], "vocab_size": args.vocab, "block_size": block})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (batch, block + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    steps, warmup = {}, {}
    for v in args.variants:
        steps[v], warmup[v] = make_step(v, mc, device, dtype, x, y)
        print(f"  {preset} {v}: first two steps {warmup[v]:.1f}s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    peaks = []
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        peaks.append(measure_matmul_peak(device, dtype, n=args.peak_n))
        for v in args.variants if r % 2 == 0 else args.variants[::-1]:  # no variant always goes first
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                steps[v]()
                sync(device)
                times[v].append(time.perf_counter() - t0)
    tokens_per_step = batch * block
    flops_per_token = GPT(mc).flops_per_token()
    peak = statistics.median(peaks)
    shape = {k: getattr(mc, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "block_size")}
    out = {"preset": preset, "batch": batch, "block": block, "model": shape,
           "params": GPT(mc).num_params(), "flops_per_token": flops_per_token, "peak_flops_median": peak,
           "peak_flops_max": max(peaks), "load_before": load_before, "load_after": os.getloadavg()[0], "variants": {}}
    ref = statistics.median(times[args.variants[0]])
    for v in args.variants:
        med = statistics.median(times[v])
        out["variants"][v] = {
            "tok_per_s": tokens_per_step / med, "tok_per_s_best": tokens_per_step / min(times[v]),
            "mfu": flops_per_token * tokens_per_step / med / peak, f"speedup_vs_{args.variants[0]}": ref / med,
            "first_two_steps_s": warmup[v], "step_times_s": [round(t, 4) for t in times[v]],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default: stories260k stories15m (CPU), "
                        "stories15m stories42m stories110m (CUDA)")
    parser.add_argument("--variants", nargs="+", default=["reference", "slmkit-eager", "slmkit"],
                        choices=["reference", "slmkit-eager", "slmkit", "slmkit-blocks"], help="the first one is the baseline")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--preset-shape", action="store_true",
                        help="each preset's own train.batch_size x model.block_size instead of --batch x --block")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--peak-n", type=int, default=None, help="size of the square matmul for the peak")
    parser.add_argument("--out", default=None, help="JSON result path (default bench/results/train_speed_<device>.json)")
    args = parser.parse_args()

    device = args.device
    if device == "cuda":
        dtype = torch.bfloat16
        args.presets = args.presets or ["stories15m", "stories42m", "stories110m"]
        args.peak_n = args.peak_n or 8192
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        dtype = torch.float32
        args.presets = args.presets or ["stories260k", "stories15m"]
        args.peak_n = args.peak_n or 2048
        torch.set_num_threads(args.threads)
        name = f"CPU, {args.threads} threads"
    results = {
        "command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]),
        "device": name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rounds": args.rounds, "steps_per_round": args.steps, "presets": [],
    }
    for preset in args.presets:
        results["presets"].append(bench_preset(preset, args, device, dtype))

    base = args.variants[0]
    print(f"\n{name}, {results['dtype']}, medians of {args.rounds} x {args.steps} steps "
          f"(load average {results['presets'][0]['load_before']:.1f})\n")
    print(f"| preset | batch x context | variant | tokens/s | vs {base} | MFU | matmul peak | first 2 steps |")
    print("|---|---|---|---|---|---|---|---|")
    for p in results["presets"]:
        for v, r in p["variants"].items():
            print(f"| {p['preset']} | {p['batch']} x {p['block']} | {v} | {r['tok_per_s']:,.0f} | "
                  f"{r[f'speedup_vs_{base}']:.2f}x | {r['mfu']:.0%} | "
                  f"{p['peak_flops_median'] / 1e9:,.0f} GFLOP/s | {r['first_two_steps_s']:.0f}s |")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"train_speed_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
