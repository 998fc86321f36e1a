"""The whole model in one file: a decoder-only transformer in the GPT-2 / Llama family.

Read top to bottom: the config, then the pieces (norm, rotary positions, attention, MLP), then the
block and the model. Every variant the config allows (LayerNorm or RMSNorm, learned or rotary
positions, GELU or SwiGLU, multi-head or grouped-query attention, tied or untied embeddings) goes
through the same few classes, so there is one code path to read and to test.

Generation adds one thing, the KV cache: ``GPT.forward_cached`` runs only the new tokens and
reads the keys and values of earlier ones from a ``KVCache``. Training never touches it:
``GPT.forward(idx, targets)`` is the plain full-sequence pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit import cpu_kernels
from slmkit.errors import SlmError


@dataclass
class ModelConfig:
    """Shape and variant of the transformer. ``vocab_size`` normally comes from the prepared data."""

    vocab_size: int = 4096
    block_size: int = 256  # the context length: the longest sequence the model sees
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # grouped-query attention when < n_head; None means n_head
    n_embd: int = 288
    mlp_hidden: int | None = None  # None: 4*n_embd for GELU, the Llama rule (2/3 of that) for SwiGLU
    dropout: float = 0.0
    bias: bool = False  # biases in linear layers and LayerNorm
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    positions: Literal["learned", "rope"] = "rope"
    activation: Literal["gelu", "swiglu"] = "swiglu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def validate(self) -> None:
        """Check relations between fields; raise SlmError with one clear line."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise SlmError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise SlmError(
                f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}: "
                "choose a width that is a multiple of the head count"
            )
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise SlmError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.positions == "rope" and self.head_dim % 2:
            raise SlmError(f"rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlmError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise SlmError(f"model.mlp_hidden must be positive, got {self.mlp_hidden}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.activation == "gelu":
            return 4 * self.n_embd
        # SwiGLU has three matrices instead of two: 2/3 of 4*d keeps the parameter count, rounded
        # up to a multiple of 32 for friendlier matmul shapes (as in Llama and llama2.c).
        return 32 * math.ceil(int(2 * 4 * self.n_embd / 3) / 32)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim/2) for rotary position embedding."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position. Uses the half-split layout of GPT-NeoX and HF Llama, so
    exported weights need no permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation ``apply_rope`` does at one position, as a (head_dim, head_dim) matrix R with
    ``x @ R == apply_rope(x)`` for row vectors; cos and sin (..., head_dim/2) give (..., D, D).
    Decoding rotates every query and key head of a layer with one matmul this way."""
    c, s = torch.diag_embed(cos), torch.diag_embed(sin)
    # (x1, x2) @ [[c, s], [-s, c]] = (x1 cos - x2 sin, x1 sin + x2 cos)
    return torch.cat((torch.cat((c, s), -1), torch.cat((-s, c), -1)), -2)


# PyTorch >= 2.5 lets SDPA share key/value heads between query heads (GQA) without copying them.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class KVCache:
    """The keys and values of every token seen so far, so that generation runs one token per step.

    Buffers are allocated once, for ``max_len`` slots (at most the context length), and filled
    left to right: ``length`` slots are in use. All rows of a batch share slot indices, so a batch
    of prompts of different lengths is left-padded: row ``b``'s first real token is in slot
    ``start[b]``. Positions count from there (the first real token has position 0), and padding
    slots are masked out, so a row's numbers do not depend on what else is in the batch.
    The buffers start as zeros, and must: ``gpu_decode.GraphDecoder`` attends over every slot with
    the unfilled ones masked, and a zero weight times a NaN left in memory would still be NaN.
    """

    k: torch.Tensor  # (n_layer, B, n_kv_head, max_len, head_dim)
    v: torch.Tensor  # same shape as k
    start: torch.Tensor  # (B,) first real slot of each row
    length: int = 0  # slots filled so far
    padded: bool = False  # whether any row has padding (else no mask is needed when decoding)

    @classmethod
    def empty(
        cls, config: ModelConfig, batch_size: int, *, start: torch.Tensor | None = None,
        max_len: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        if start is None:
            start = torch.zeros(batch_size, dtype=torch.long, device=device)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, v, start.to(device=device, dtype=torch.long), padded=bool(start.any()))

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the next T slots of every row (padding slots get 0)."""
        slots = torch.arange(self.length, self.length + T, device=self.start.device)
        return (slots - self.start[:, None]).clamp_(min=0)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, length+T) for the next T queries: causal, and no real token sees
        padding. A padding query sees only itself, which keeps its (unused) values finite.
        None when nothing needs masking: one new token per row and no padding."""
        if T == 1 and not self.padded:
            return None
        device = self.start.device
        q = torch.arange(self.length, self.length + T, device=device)[:, None]  # (T, 1) query slots
        kv = torch.arange(self.length + T, device=device)  # (S,) key slots
        real = kv >= self.start[:, None, None]  # (B, 1, S)
        return ((kv <= q) & (real | (kv == q)))[:, None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values (B, n_kv, T, head_dim) after the filled slots and
        return that layer's keys and values for all slots so far. ``length`` is advanced by the
        model once every layer has stored."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (in that order, repeats allowed): beam search follows its beams."""
        self.k, self.v, self.start = self.k[:, rows], self.v[:, rows], self.start[rows]


class LinearT(NamedTuple):
    """A linear layer for decoding: its weight transposed (a view, no copy) and its bias, so that
    ``x @ w_t (+ b)`` is one ``mm`` or ``addmm``."""

    w_t: torch.Tensor
    b: torch.Tensor | None

    @classmethod
    def of(cls, linear: nn.Linear) -> LinearT:
        return cls(linear.weight.t(), linear.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.w_t) if self.b is None else torch.addmm(self.b, x, self.w_t)

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``x + linear(h)``: the residual add fused into the matmul."""
        out = torch.addmm(x, h, self.w_t)
        return out if self.b is None else out.add_(self.b)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``linear(x)`` written into a preallocated ``out`` (no allocation)."""
        if self.b is None:
            torch.mm(x, self.w_t, out=out)
        else:
            torch.addmm(self.b, x, self.w_t, out=out)

    def add_into(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """``x += linear(h)`` in place."""
        x.addmm_(h, self.w_t)
        if self.b is not None:
            x.add_(self.b)


class LayerWeights(NamedTuple):
    """One block's tensors for decoding. A norm is (weight, bias or None)."""

    norm1: tuple[torch.Tensor, torch.Tensor | None]
    qkv: LinearT
    proj: LinearT
    norm2: tuple[torch.Tensor, torch.Tensor | None]
    up: LinearT
    down: LinearT


@dataclass(frozen=True)
class DecodeWeights:
    """Every tensor ``GPT.decode_step`` reads, gathered once per generation (``GPT.decode_weights``).
    A step at batch 1 makes a few hundred small PyTorch calls, and each module attribute lookup
    costs about as much as one of them: looking the weights up once made decoding 1.2x faster.
    Views of the model's parameters, not copies: valid while the model's modules stay the same."""

    layers: list[LayerWeights]
    norm: tuple[torch.Tensor, torch.Tensor | None]
    head: LinearT


class Attention(nn.Module):
    """Causal self-attention with fused QKV, optional GQA: slmkit's CPU kernel where it pays
    (cpu_kernels.py: float32 on a CPU, head sizes up to 16 and 32, 48, 64), else PyTorch's SDPA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_rope = config.positions == "rope"

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
        cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:  # generation: attend over the cached tokens plus these T new ones
            k, v = cache.store(layer, k, v)
            y = self._attend_cached(q, k, v, mask).transpose(1, 2).reshape(B, T, C)
        elif dropout == 0.0 and cpu_kernels.attention_usable(q, k, v):  # CPU float32: slmkit's own kernel
            y = cpu_kernels.causal_attention(q, k, v)
        else:  # the whole sequence at once
            if self.n_kv != self.n_head:
                rep = self.n_head // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
            y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.n_kv == self.n_head:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        rep = self.n_head // self.n_kv
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask
        )


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama): up, activation, down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        hidden = config.hidden_dim
        # SwiGLU's gate and up projections share one matmul; the output is split in forward.
        self.up = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activate(self.up(x))))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return activate(h, self.swiglu)


def activate(h: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """The MLP's nonlinearity: SwiGLU on the (gate, up) halves of ``h``, or GELU (tanh form)."""
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def decode_norm(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None], c: ModelConfig,
                eps: torch.Tensor) -> torch.Tensor:
    """The decode steps' norm: RMSNorm in three calls (mean(x^2) + eps = |x|^2 / C + eps), or
    LayerNorm. ``eps`` is a one-element tensor: a Python float costs an allocation per call."""
    if c.norm == "rmsnorm":
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * torch.addcmul(eps, n, n, value=1.0 / c.n_embd).rsqrt_() * wb[0]
    return F.layer_norm(x, (c.n_embd,), wb[0], wb[1], c.norm_eps)


def decode_qkv(layer: LayerWeights, x: torch.Tensor, c: ModelConfig, eps: torch.Tensor, rot: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's queries (B, H, D) and keys (B, KV, D), rotated by ``rot`` (rotary positions),
    and values (B, KV * D), from the residual stream x (B, C)."""
    H, KV, D = c.n_head, c.kv_heads, c.head_dim
    qk, v = layer.qkv(decode_norm(x, layer.norm1, c, eps)).split_with_sizes(((H + KV) * D, KV * D), 1)
    qk = qk.view(-1, H + KV, D)
    if rot is not None:
        qk = qk @ rot
    q, k = qk.split_with_sizes((H, KV), 1)
    return q, k, v


def decode_rest(layer: LayerWeights, x: torch.Tensor, attended: torch.Tensor, c: ModelConfig,
                eps: torch.Tensor) -> torch.Tensor:
    """The rest of a decode step's block after attention: the projection and the MLP, each added
    to the residual stream (the adds fused into the matmuls)."""
    x = layer.proj.add_to(x, attended)
    return layer.down.add_to(x, activate(layer.up(decode_norm(x, layer.norm2, c, eps)), c.activation == "swiglu"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
        cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.norm2(x))


def ce_chunk_rows(h: torch.Tensor, vocab_size: int) -> int:
    """Rows per chunk of the fused head + cross-entropy: about 2 MB of fp32 logits on a CPU, so a
    chunk stays in a core's L2 cache; 64 MB on a GPU, where launches cost more than memory."""
    budget = (64 << 20) if h.is_cuda else (2 << 20)
    return max(16, budget // (4 * vocab_size))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 ignored), chunk by chunk.

    The vocabulary projection and its loss are the largest activation of a small model: (tokens,
    vocab) logits, written, read by log-softmax, written again as their gradient. Here each chunk
    of rows makes its logits, its loss and at once its gradients for ``h`` and ``weight``, while the
    chunk is still in cache; backward only scales the stored gradients. Same result as
    ``F.cross_entropy(h @ weight.T, targets)`` up to float rounding.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        if cpu_kernels.head_loss_usable(h, weight):  # float32 on a CPU: the same loop, in C++ and eager
            loss, grad_h, grad_w = cpu_kernels.head_loss(h, weight, targets, chunk)
            ctx.save_for_backward(grad_h, grad_w)
            return loss
        # Under autocast, run the matmuls in the autocast dtype and the softmax in fp32, as F.linear
        # followed by logits.float() would.
        device = h.device.type
        cdt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(cdt)
            acc = torch.promote_types(cdt, torch.float32)  # fp32, or fp64 for gradcheck
            valid = targets != -1
            safe = targets.clamp(min=0)[:, None]
            count = valid.sum().clamp(min=1)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            loss = torch.zeros((), dtype=acc, device=h.device)
            for s in range(0, h.shape[0], chunk):
                hs = h[s : s + chunk].to(cdt)
                logits = (hs @ w.t()).to(acc)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                keep = valid[s : s + chunk, None].to(acc)
                loss = loss + ((lse - logits.gather(1, safe[s : s + chunk])) * keep).sum()
                # d loss / d logits = (softmax - onehot) / count, on the kept rows only
                p = logits.sub_(lse).exp_()
                p.scatter_add_(1, safe[s : s + chunk], -keep)
                p = p.mul_(keep / count).to(cdt)
                grad_h[s : s + chunk] = (p @ w).to(h.dtype)
                grad_w += (p.t() @ hs).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


class GPT(nn.Module):
    """Token embedding, positions, ``n_layer`` blocks, a final norm and the vocabulary head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.positions == "rope":
            cos, sin = rope_tables(config, config.block_size)
            # Not persistent: derived from the config, so checkpoints stay small and exact.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position table (and without the token table
        when it is not shared with the head), the count that compute scales with."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T); with targets, also the mean cross-entropy
        (targets of -1 are ignored). Training passes ``return_logits=False``: the loss is then
        computed chunk by chunk without ever holding all the logits, and the logits are None.
        ``last_only`` (without targets) gives the last position's logits only, (B, 1, vocab): all
        that sampling needs, as in nanoGPT's inference forward."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        cos = self.rope_cos[:T] if self.rope_cos is not None else None
        sin = self.rope_sin[:T] if self.rope_sin is not None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if targets is not None and not return_logits and torch.is_grad_enabled():
            h = x.reshape(B * T, -1)
            chunk = ce_chunk_rows(h, self.config.vocab_size)
            return None, ChunkedCrossEntropy.apply(h, self.lm_head.weight, targets.reshape(-1), chunk)
        if last_only and targets is None:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Generation: run T new tokens per row (B, T) after the ``cache.length`` cached ones, store
        their keys and values, and return the logits of the last position (B, vocab), or of every
        position (B, T, vocab) with ``all_logits``. The prompt goes in as one call (prefill), then
        one token per call. Same numbers as ``forward`` on the whole sequence."""
        B, T = idx.shape
        if cache.length + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {T} tokens > {cache.max_len} slots")
        pos = cache.positions(T)  # (B, T): each row counts from its first real token
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        cos = self.rope_cos[pos].unsqueeze(1) if self.rope_cos is not None else None  # (B, 1, T, hd/2)
        sin = self.rope_sin[pos].unsqueeze(1) if self.rope_sin is not None else None
        mask = cache.attn_mask(T)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask)
        cache.length += T
        if not all_logits:
            x = x[:, -1]
        return self.lm_head(self.norm(x))

    def reads_float_weights(self) -> bool:
        """Whether ``decode_step`` can run this model: every linear layer exactly ``nn.Linear``, whose
        weight it reads directly (``torch.ao`` int8 dynamic quantization packs its weights, and a
        subclass may change what forward does, e.g. a LoRA adapter)."""
        linears = [self.lm_head] + [m for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.up, b.mlp.down)]
        return all(type(m) is nn.Linear for m in linears)

    def decode_weights(self) -> DecodeWeights:
        """The tensors ``decode_step`` reads, looked up once (see ``DecodeWeights``)."""
        if not self.reads_float_weights():
            raise ValueError("decode_step needs plain nn.Linear layers (this model's are quantized): "
                             "generate with path='cached'")

        def norm(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            return m.weight, getattr(m, "bias", None)  # RMSNorm has no bias

        layers = [
            LayerWeights(norm(b.norm1), LinearT.of(b.attn.qkv), LinearT.of(b.attn.proj),
                         norm(b.norm2), LinearT.of(b.mlp.up), LinearT.of(b.mlp.down))
            for b in self.blocks
        ]
        return DecodeWeights(layers, norm(self.norm), LinearT.of(self.lm_head))

    def decode_step(self, idx: torch.Tensor, cache: KVCache, weights: DecodeWeights | None = None) -> torch.Tensor:
        """The PyTorch fast path of generation: one new token per row, ids (B,) -> next-token logits
        (B, vocab). (For float32 on the CPU, ``slmkit.cpu_decode.CPUDecoder`` runs the same math with
        the small operations in NumPy, faster at small batches; on a GPU,
        ``slmkit.gpu_decode.GraphDecoder`` replays it from a CUDA graph.)

        The same math as ``forward_cached`` with T=1 (tested to give the same logits), written
        straight through over the weights. At batch 1 on a CPU the matrix-vector products take
        under half of a step and the rest is per-call overhead (2-5 us per PyTorch call), so this
        counts calls: weights looked up once per generation (pass ``weights=model.decode_weights()``
        when calling it repeatedly, as generation does); rotary positions as one matmul with a
        rotation matrix made once per step for all layers; attention as ``baddbmm`` (scaled, and
        masked only for padded batches), softmax and ``bmm`` over the cache, with query heads
        grouped by their key/value head (GQA without copies); RMSNorm in three calls; residual adds
        fused into the matmuls. It skips dropout and module hooks: it is for inference (under
        ``torch.inference_mode``), in eval mode."""
        B, S = idx.size(0), cache.length
        if S >= cache.max_len:
            raise ValueError(f"KV cache full: {S} + 1 tokens > {cache.max_len} slots")
        c = self.config
        w = weights or self.decode_weights()
        H, KV, D = c.n_head, c.kv_heads, c.head_dim
        # Position of the new token: S in every row, unless rows are padded.
        pos = cache.positions(1)[:, 0] if cache.padded else S  # (B,) or an int
        x = F.embedding(idx, self.tok_emb.weight)  # (B, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[pos]
        rot = rope_matrix(self.rope_cos[pos], self.rope_sin[pos]).to(x.dtype) if self.rope_cos is not None else None
        eps = x.new_full((1,), c.norm_eps)
        if cache.padded:  # additive mask over the slots, shared by the query heads of a kv head
            mask = cache.attn_mask(1)  # (B, 1, 1, S+1)
            bias = x.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))
            bias, beta = bias.expand(B, KV, 1, S + 1).reshape(B * KV, 1, S + 1), 1.0
        else:
            bias, beta = x.new_zeros(1, 1, 1), 0.0
        # (n_layer, B * KV, max_len, D): one (rows x kv heads) batch of caches per layer
        keys, values = cache.k.view(c.n_layer, B * KV, -1, D), cache.v.view(c.n_layer, B * KV, -1, D)
        for layer, k_cache, v_cache in zip(w.layers, keys, values):
            q, k, v = decode_qkv(layer, x, c, eps, rot)
            k_cache.select(1, S).copy_(k.reshape(B * KV, D))
            v_cache.select(1, S).copy_(v.reshape(B * KV, D))
            q = q.reshape(B * KV, H // KV, D)  # query heads grouped by the kv head they read
            scores = torch.baddbmm(bias, q, k_cache.narrow(1, 0, S + 1).transpose(1, 2), beta=beta, alpha=D**-0.5)
            probs = scores.softmax(-1, dtype=torch.float32)  # fp32 (as in SDPA) also for bf16 / fp16 models
            if probs.dtype != q.dtype:
                probs = probs.to(q.dtype)
            x = decode_rest(layer, x, torch.bmm(probs, v_cache.narrow(1, 0, S + 1)).view(B, H * D), c, eps)
        cache.length = S + 1
        return w.head(decode_norm(x, w.norm, c, eps))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * params for the matmuls plus the attention term
        (PaLM appendix B; the same estimate nanoGPT uses for MFU)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
