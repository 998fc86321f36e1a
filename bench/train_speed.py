"""Training throughput: slmkit's training step against plain references, in the same process.

    python bench/train_speed.py                                  # CPU, 2 threads, fp32 (+ bf16 rows on a bf16 CPU)
    python bench/train_speed.py --presets stories15m --variants reference slmkit slmkit-bf16   # fp32 vs bf16
    python bench/train_speed.py --device cuda --preset-shape    # GPU, bf16: 15m, 42m, 110m at their own shapes
    python bench/train_speed.py --smoke                          # seconds: tiny model, eager only, a tmp file

One training step is forward + backward + gradient clipping + optimizer step on a fixed batch
(16 x 256 tokens by default, vocab 4096; ``--preset-shape`` takes each preset's own micro-batch and
context instead, e.g. 32 x 1024 for stories110m, the size a GPU is used at). Two architectures,
each against its own reference written the peers' way below in this file:

* ``reference``: the preset's Llama architecture the llama2.c way (its ``model.py``): eager PyTorch,
  separate q/k/v and w1/w2/w3 matmuls, hand-written RMSNorm and RoPE, SDPA, the full logits and
  F.cross_entropy, AdamW (fused on CUDA, foreach elsewhere, as nanoGPT);
* ``nanogpt``: nanoGPT's architecture (its ``model.py``) at the preset's width, depth and heads:
  learned positions, LayerNorm, one fused qkv matmul, GELU MLP 4x, biases as nanoGPT's default
  (none), tied embeddings, SDPA, full logits, AdamW with decay on 2-D weights only;
* ``slmkit-eager`` / ``slmkit``: slmkit's model and optimizer as ``Trainer.train_step`` uses them,
  the preset's architecture, uncompiled / with ``train.compile=true`` (slmkit's fastest path);
* ``slmkit-gpt2-eager`` / ``slmkit-gpt2``: the same with nanoGPT's architecture, against ``nanogpt``;
* ``slmkit-no-kernels`` (only when asked for): ``slmkit`` with slmkit's CPU kernels (attention, the
  fused head's loss: ``cpu_kernels``) left out, PyTorch's ops in their place: whether the kernels win
  on this CPU, in the same run. ``SLMKIT_KERNEL_ISA=avx2 ATEN_CPU_CAPABILITY=avx2`` measures what an
  AVX2 machine runs (both the kernels' and PyTorch's AVX2 code) on an AVX-512 one;
* ``slmkit-blocks`` (only when asked for): compile just the repeated block, which compiles faster;
* ``<variant>-bf16`` (``slmkit-bf16``, ``reference-bf16``, ...): that variant under bf16 autocast (float32
  weights and optimizer, as ``train.dtype=bfloat16``). On a CPU with native bf16 (``runtime.cpu_bf16``)
  the default list adds ``reference-bf16`` and ``slmkit-bf16``, so fp32, bf16 and the reference run
  in the same alternation; each bf16 row also gives its speed over its float32 twin.

Both peers default to ``compile=True`` on a GPU, so there the references are compiled too
(``--compile-references``, on by default with ``--device cuda``); on a CPU nanoGPT's README says
``--compile=False``, so they stay eager. Every variant reports its compile time (the first two steps
minus two steady steps) beside its steady-state speed.

The machine may be shared, so the variants run in alternation (a few steps of each, round after
round), every round also times a large square matmul, and the table shows medians; ratios between
variants of the same round survive a noisy machine better than absolute numbers. MFU is
``flops_per_token x tokens/s`` (6 x params plus the attention term). On a CPU it is taken against the
highest matmul peak measured in the run in the row's dtype (the median peak would flatter it; bf16
rows against the bf16 peak, measured every round beside the fp32 one); on a GPU against the
datasheet peak (as nanoGPT quotes MFU, for the GPUs in ``DATASHEET_PEAK``) and the highest measured
peak. The result goes to bench/results/train_speed_<device>.json with the command and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info  # noqa: E402

from slmkit import cpu_kernels  # noqa: E402
from slmkit.config import load_preset  # noqa: E402
from slmkit.model import GPT, ModelConfig  # noqa: E402
from slmkit.runtime import autocast, cpu_bf16, measure_matmul_peak  # noqa: E402
from slmkit.trainer import TrainConfig, make_optimizer  # noqa: E402

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


class NanoBlock(nn.Module):
    """nanoGPT's Block: pre-LayerNorm, causal self-attention with one fused qkv matmul, GELU MLP."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        C, self.nh = c.n_embd, c.n_head
        self.ln_1 = nn.LayerNorm(C, bias=c.bias)
        self.c_attn = nn.Linear(C, 3 * C, bias=c.bias)
        self.attn_proj = nn.Linear(C, C, bias=c.bias)
        self.ln_2 = nn.LayerNorm(C, bias=c.bias)
        self.c_fc = nn.Linear(C, 4 * C, bias=c.bias)
        self.mlp_proj = nn.Linear(4 * C, C, bias=c.bias)
        self.gelu = nn.GELU()  # the exact (erf) form, as nanoGPT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT (learned positions, LayerNorm, GELU, tied embeddings), full logits + cross-entropy."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(NanoBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def nanogpt_optimizer(model: nn.Module, device: str) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: weight decay on 2-D parameters only, fused AdamW on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")


def gpt2_arch(mc: ModelConfig) -> ModelConfig:
    """The preset's shape with nanoGPT's architecture (no grouped-query attention, MLP 4x)."""
    return ModelConfig(**{**mc.__dict__, "positions": "learned", "norm": "layernorm", "activation": "gelu",
                          "bias": False, "n_kv_head": None, "mlp_hidden": None})


# --------------------------------------------------------------------------- the steps

# variant -> (architecture, implementation, compiled); None: --compile-references decides
VARIANTS: dict[str, tuple[str, str, bool | None]] = {
    "reference": ("llama", "reference", None), "slmkit-eager": ("llama", "slmkit", False),
    "slmkit": ("llama", "slmkit", True), "slmkit-blocks": ("llama", "slmkit-blocks", False),
    "nanogpt": ("gpt2", "nanogpt", None), "slmkit-gpt2-eager": ("gpt2", "slmkit", False),
    "slmkit-gpt2": ("gpt2", "slmkit", True), "slmkit-no-kernels": ("llama", "slmkit-no-kernels", True),
}
BASELINE = {"llama": "reference", "gpt2": "nanogpt"}
BF16 = "-bf16"  # a variant name ending in it: that variant under bf16 autocast


def parse_variant(name: str) -> tuple[str, bool]:
    """``"slmkit-bf16"`` -> ``("slmkit", True)``: the variant of VARIANTS and whether it runs in bf16."""
    return (name[: -len(BF16)], True) if name.endswith(BF16) else (name, False)


def variant_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype of a variant: bf16 for ``*-bf16``, else the run's (fp32 on a CPU, bf16 on a GPU)."""
    return torch.bfloat16 if parse_variant(name)[1] else dtype
# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), the peak nanoGPT quotes MFU against.
DATASHEET_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def without_cpu_kernels():  # noqa: ANN201
    """slmkit's model with PyTorch's attention and loss in place of its CPU kernels (while inside)."""
    saved = cpu_kernels._use_kernels
    cpu_kernels._use_kernels = lambda: False
    try:
        yield
    finally:
        cpu_kernels._use_kernels = saved


def make_step(variant: str, mc: ModelConfig, device: str, dtype: torch.dtype, x: torch.Tensor, y: torch.Tensor,
              compile_references: bool) -> tuple[Callable[[], None], float]:
    """A function running one training step of ``variant``, and the seconds its first two steps took
    (compilation included)."""
    torch.manual_seed(0)
    arch, impl, compiled = VARIANTS[parse_variant(variant)[0]]
    dtype = variant_dtype(variant, dtype)
    if arch == "gpt2":
        mc = gpt2_arch(mc)
    if impl in ("reference", "nanogpt"):
        model = (RefGPT(mc) if impl == "reference" else NanoGPT(mc)).to(device)
        if impl == "reference":  # nanoGPT: fused AdamW on CUDA only
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=device == "cuda")
        else:
            opt = nanogpt_optimizer(model, device)
        net = torch.compile(model) if compile_references else model
        forward = lambda: net(x, y)[1]  # noqa: E731
    else:
        model = GPT(mc).to(device)
        cfg = TrainConfig(lr=1e-4, compile=bool(compiled))
        opt = make_optimizer(model, cfg, device)
        net = torch.compile(model) if cfg.compile else model
        if impl == "slmkit-blocks":
            for block in model.blocks:
                block.compile()
        forward = lambda: net(x, y, return_logits=False)[1]  # noqa: E731

    def step() -> None:
        with without_cpu_kernels() if impl == "slmkit-no-kernels" else contextlib.nullcontext():
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


def is_compiled(variant: str, compile_references: bool) -> bool:
    _, impl, compiled = VARIANTS[parse_variant(variant)[0]]
    return compile_references if compiled is None else compiled or impl == "slmkit-blocks"


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
        steps[v], warmup[v] = make_step(v, mc, device, dtype, x, y, args.compile_references)
        print(f"  {preset} {v}: first two steps {warmup[v]:.1f}s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    # Every round times the matmul peak in each dtype the variants use (fp32 and bf16 on a CPU).
    dtypes = sorted({variant_dtype(v, dtype) for v in args.variants} | {dtype}, key=str)
    peaks: dict[torch.dtype, list[float]] = {d: [] for d in dtypes}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for d in dtypes:
            # bf16 where the CPU emulates it: measure_matmul_peak's own smaller size keeps this quick
            emulated = device == "cpu" and d == torch.bfloat16 and cpu_bf16() is None
            peaks[d].append(measure_matmul_peak(device, d, n=None if emulated else args.peak_n))
        for v in args.variants if r % 2 == 0 else args.variants[::-1]:  # no variant always goes first
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                steps[v]()
                sync(device)
                times[v].append(time.perf_counter() - t0)
    tokens_per_step = batch * block
    peak_max, peak_median = max(peaks[dtype]), statistics.median(peaks[dtype])
    shape = {k: getattr(mc, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "block_size")}
    out = {"preset": preset, "batch": batch, "block": block, "model": shape,
           "params": GPT(mc).num_params(), "flops_per_token": GPT(mc).flops_per_token(),
           "peak_flops_median": peak_median, "peak_flops_max": peak_max, "peak_flops_all": peaks[dtype],
           "load_before": load_before, "load_after": os.getloadavg()[0], "variants": {}}
    if torch.bfloat16 in peaks and dtype != torch.bfloat16:  # the bf16 peak beside the fp32 one
        out.update(peak_flops_bf16_median=statistics.median(peaks[torch.bfloat16]),
                   peak_flops_bf16_max=max(peaks[torch.bfloat16]), peak_flops_bf16_all=peaks[torch.bfloat16])
    datasheet = next((v for k, v in DATASHEET_PEAK.items() if k in args.device_name), None) if device == "cuda" else None
    if datasheet:
        out["peak_flops_datasheet"] = datasheet
    for v in args.variants:
        twin, _ = parse_variant(v)
        arch = VARIANTS[twin][0]
        arch_mc = gpt2_arch(mc) if arch == "gpt2" else mc
        flops = GPT(arch_mc).flops_per_token()
        med = statistics.median(times[v])
        base = BASELINE[arch]
        vdt = variant_dtype(v, dtype)
        row = {
            "architecture": "nanoGPT (learned, LayerNorm, GELU)" if arch == "gpt2" else "Llama (RoPE, RMSNorm, SwiGLU)",
            "dtype": str(vdt).replace("torch.", ""),
            "params": GPT(arch_mc).num_params(), "flops_per_token": flops, "compiled": is_compiled(v, args.compile_references),
            "tok_per_s": tokens_per_step / med, "tok_per_s_best": tokens_per_step / min(times[v]),
            # against the highest peak of the run in the row's dtype; the median peak is kept for older comparisons
            "mfu": flops * tokens_per_step / med / max(peaks[vdt]),
            "mfu_vs_median_peak": flops * tokens_per_step / med / statistics.median(peaks[vdt]),
            "baseline": base if base in times else None,
            "first_two_steps_s": warmup[v], "compile_s": max(warmup[v] - 2 * med, 0.0),
            "step_s_median": med, "step_times_s": [round(t, 4) for t in times[v]],
        }
        if datasheet:
            row["mfu_vs_datasheet"] = flops * tokens_per_step / med / datasheet
        if base in times:
            row["speedup_vs_baseline"] = statistics.median(times[base]) / med
            row["speedup_vs_reference"] = row["speedup_vs_baseline"]  # the key older files use
        if twin != v and twin in times:  # a bf16 row against the same variant in the run's dtype
            row["float32_twin"] = twin
            row["speedup_vs_float32"] = statistics.median(times[twin]) / med
        out["variants"][v] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default: stories260k stories15m (CPU), "
                        "stories15m stories42m stories110m (CUDA)")
    parser.add_argument("--variants", nargs="+", default=None, choices=[*VARIANTS, *(v + BF16 for v in VARIANTS)],
                        help="each is compared with its architecture's reference (reference or nanogpt) when that "
                        "runs too; NAME-bf16 is NAME under bf16 autocast (default: reference slmkit-eager slmkit "
                        "nanogpt slmkit-gpt2, plus reference-bf16 slmkit-bf16 on a CPU with native bf16)")
    parser.add_argument("--compile-references", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the references (default: on with --device cuda, as the peers "
                        "default to compile=True there; off on a CPU, as nanoGPT's README says)")
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
    parser.add_argument("--smoke", action="store_true", help="seconds: the tiny preset at 2 x 32 tokens, the eager "
                        "variants, 1 round, written to a temporary file (not bench/results)")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.batch, args.block, args.vocab, args.rounds, args.steps = ["tiny"], 2, 32, 256, 1, 1
        args.variants = ["reference", "slmkit-eager", "nanogpt", "slmkit-gpt2-eager", "slmkit-eager-bf16"]
        args.peak_n = 256
        if args.out is None:
            import tempfile

            args.out = str(Path(tempfile.mkdtemp(prefix="slm-train-speed-smoke-")) / "train_speed.json")

    device = args.device
    if args.variants is None:
        args.variants = ["reference", "slmkit-eager", "slmkit", "nanogpt", "slmkit-gpt2"]
        if device == "cpu" and cpu_bf16():
            args.variants += ["reference-bf16", "slmkit-bf16"]
    if args.compile_references is None:
        args.compile_references = device == "cuda"
    if device == "cuda":
        dtype = torch.bfloat16
        args.presets = args.presets or ["stories15m", "stories42m", "stories110m"]
        args.peak_n = args.peak_n or 8192
        torch.backends.cuda.matmul.allow_tf32 = True
        name = args.device_name = torch.cuda.get_device_name()
    else:
        dtype = torch.float32
        args.presets = args.presets or ["stories260k", "stories15m"]
        args.peak_n = args.peak_n or 2048
        torch.set_num_threads(args.threads)
        args.device_name = "cpu"
        name = f"CPU, {args.threads} threads"
    results = {
        **machine_info(), "device": name, "threads": args.threads if device == "cpu" else None,
        "dtype": str(dtype).replace("torch.", ""), "cpu_bf16": cpu_bf16() if device == "cpu" else None,
        "compile_references": args.compile_references,
        # which code ran: the kernels' build (SLMKIT_KERNEL_ISA) and PyTorch's (ATEN_CPU_CAPABILITY)
        "kernel_isa": cpu_kernels.kernel_isa() if device == "cpu" else None,
        "kernels_used": cpu_kernels.available() is None if device == "cpu" else None,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability() if device == "cpu" else None,
        "mfu_peak": "highest measured" if device == "cpu" else "datasheet (mfu_vs_datasheet) and highest measured (mfu)",
        "rounds": args.rounds, "steps_per_round": args.steps, "presets": [],
    }
    for preset in args.presets:
        results["presets"].append(bench_preset(preset, args, device, dtype))

    print(f"\n{name}, {results['dtype']}, medians of {args.rounds} x {args.steps} steps "
          f"(load average {results['presets'][0]['load_before']:.1f}); MFU against the highest measured peak\n")
    for p in results["presets"]:
        print("| preset | batch x context | variant | dtype | tokens/s | vs its reference | vs float32 | MFU | compile |")
        print("|---|---|---|---|---|---|---|---|---|")
        for v, r in p["variants"].items():
            ratio = f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}" if r["baseline"] else "-"
            twin = f"{r['speedup_vs_float32']:.2f}x" if "speedup_vs_float32" in r else "-"
            print(f"| {p['preset']} | {p['batch']} x {p['block']} | {v} | {r['dtype']} | {r['tok_per_s']:,.0f} | {ratio} | "
                  f"{twin} | {r['mfu']:.0%} | {r['compile_s']:.0f}s |")
        bf16 = f", bfloat16 {p['peak_flops_bf16_max'] / 1e9:,.0f}" if "peak_flops_bf16_max" in p else ""
        print(f"\n{p['preset']}: highest measured matmul peak, GFLOP/s: {results['dtype']} "
              f"{p['peak_flops_max'] / 1e9:,.0f}{bf16}\n")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"train_speed_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
