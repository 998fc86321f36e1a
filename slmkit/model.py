"""The whole model in one file: a decoder-only transformer in the GPT-2 / Llama family.

Read top to bottom: the config, the pieces (norms, rotary positions, attention, MLP), the block
and the model. Every variant the config allows (LayerNorm or RMSNorm, learned or rotary positions,
GELU or SwiGLU, multi-head or grouped-query attention, tied or untied embeddings) goes through the
same few classes, so there is one code path to read and to test. This is the reference math: the
fast decoders in ``slmkit.decode`` and the ONNX export are tested against (or built from) it, and
a new model feature lands here first.

``GPT.forward`` is the one forward. Training calls it on whole sequences. Generation hands it a
KV cache (anything with the small ``Cache`` protocol below; ``slmkit.decode.KVCache`` is the
preallocated one): the new tokens then take their positions and attention mask from the cache,
and each attention layer stores its keys and values there and attends over all of them.
Fine-tuning packs several examples into one row and hands in ``segments``, each token's example
number: positions then restart at every example and attention stays inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit import cpu_kernels
from slmkit.errors import SlmError
from slmkit.loss import ChunkedCrossEntropy, ce_chunk_rows

@dataclass
class ModelConfig:
    """Shape and variant of the transformer. ``vocab_size`` normally comes from the prepared data."""

    vocab_size: int = 4096
    block_size: int = 256  # the context length: the longest sequence the model sees
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # grouped-query attention when < n_head; None means n_head
    n_embd: int = 288
    head_size: int | None = None  # None: n_embd // n_head; set by pruning, which removes heads or width
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
        if self.head_size is not None and self.head_size <= 0:
            raise SlmError(f"model.head_size must be positive, got {self.head_size}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise SlmError(
                f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}: "
                "choose a width that is a multiple of the head count"
            )
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise SlmError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.positions == "rope" and self.head_dim % 2:
            raise SlmError(f"model.positions=rope needs an even head size (model.head_size, or model.n_embd / "
                           f"model.n_head), got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise SlmError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise SlmError(f"model.mlp_hidden must be positive, got {self.mlp_hidden}")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

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


class Cache(Protocol):
    """What ``GPT.forward`` needs of a KV cache: the keys and values of the tokens seen so far.

    ``length`` tokens are cached; the model adds the T new ones after its pass. Rows of a batch
    may start at different slots (left padding), so positions and the mask come from the cache."""

    length: int

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens: (B, T), or (1, T) when every row has the same."""

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, length + T): which cached and new keys each new query may see;
        None when all of them (one new token, no padding)."""

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep layer ``layer``'s new keys and values (B, n_kv_head, T, head_dim); return that
        layer's keys and values of every token so far, (B, n_kv_head, length + T, head_dim)."""


def exporting() -> bool:
    """Whether the model is being traced into ONNX (``torch.onnx.export(..., dynamo=False)``): the
    one switch to plain operations (that exporter has no RMSNorm op and no SDPA with shared
    key/value heads). Same math either way. Asking the tracer first keeps it at 0.1 us a call
    (``is_in_onnx_export`` alone takes 3 us, ~20 times a decode step)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm``, written out with plain operations while exporting to ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim/2) for rotary position embedding."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """Rotate (B, H, T, D) by position. Uses the half-split layout of GPT-NeoX and HF Llama, so
    exported weights need no permutation. ``half`` is D / 2 when the caller knows it as a number:
    an exported graph then splits by a constant instead of computing the size from x's shape in
    every layer (the attention of stories260k in onnxruntime was ~10% slower that way)."""
    x1, x2 = x.split(half or x.shape[-1] // 2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# PyTorch >= 2.5 lets SDPA share key/value heads between query heads (GQA) without copying them.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    """Causal self-attention with fused QKV, optional GQA: slmkit's CPU kernel where it pays
    (cpu_kernels.py: float32 or bf16 on a CPU, head sizes up to 16 and 32, 48, 64), else PyTorch's SDPA."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # where its keys and values go in a cache
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Cache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope, half=self.head_dim // 2), apply_rope(k, *rope, half=self.head_dim // 2)
        if cache is not None:  # generation: attend over the cached tokens plus these T new ones
            k, v = cache.store(self.layer, k, v)
        y = self.attend(q, k, v, causal=cache is None and mask is None, mask=mask)
        return self.resid_dropout(self.proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over (B, H, T, D) queries and (B, KV, S, D) keys and values,
        causal over a whole sequence or under ``mask`` (a cache's, or packed examples'); returns (B, T, C)."""
        B, _, T, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        rep = self.n_head // self.n_kv
        if exporting():  # plain ops, every query head reading its key/value head
            if rep > 1:
                k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, self.head_dim)
                v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, self.n_head, -1, self.head_dim)
            if causal:
                keys = torch.arange(k.shape[2], device=q.device)
                mask = keys[None, :] <= torch.arange(T, device=q.device)[:, None]
            scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
                scores = scores + bias.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1) @ v
        elif causal and dropout == 0.0 and cpu_kernels.attention_usable(q, k, v):  # CPU float32/bf16
            return cpu_kernels.causal_attention(q, k, v)  # (B, T, C) already
        elif causal:  # the whole sequence at once
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif rep == 1:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif _SDPA_GQA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask, dropout_p=dropout)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


def activate(h: torch.Tensor, swiglu: bool, hidden: int | None = None) -> torch.Tensor:
    """The MLP's nonlinearity: SwiGLU on the (gate, up) halves of ``h``, or GELU (tanh form).
    ``hidden``, the size of a half, as a number keeps exported graphs static (see ``apply_rope``)."""
    if swiglu:
        gate, up = h.split(hidden or h.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama): up, activation, down."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        hidden = config.hidden_dim
        # SwiGLU's gate and up projections share one matmul; the output is split in ``activate``.
        self.up = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(activate(self.up(x), self.swiglu, self.down.in_features)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: Cache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        return x + self.mlp(self.norm2(x))


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 wherever ``segments`` (B, T) changes value."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values  # minus the start of each token's segment


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask: a query sees the keys of its own segment up to itself."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


class GPT(nn.Module):
    """Token embedding, positions, ``n_layer`` blocks, a final norm and the vocabulary head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
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
        last_only: bool = False, *, cache: Cache | None = None, segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T); with targets, also the mean cross-entropy
        (targets of -1 are ignored). Training passes ``return_logits=False``: the loss is then
        computed chunk by chunk without ever holding all the logits, and the logits are None.
        ``last_only`` (without targets) gives the last position's logits only, (B, 1, vocab): all
        that sampling needs, as in nanoGPT's inference forward. With a ``cache`` the T tokens come
        after the cached ones (the prompt in one call, then one token per call): the same numbers
        as a pass over the whole sequence. ``segments`` (B, T), training only: packed examples (see
        ``hidden``)."""
        x = self.hidden(idx, cache, segments)
        if targets is not None and not return_logits and torch.is_grad_enabled():
            h = x.reshape(-1, x.size(-1))
            chunk = ce_chunk_rows(h, self.config.vocab_size)
            return None, ChunkedCrossEntropy.apply(h, self.lm_head.weight, targets.reshape(-1), chunk)
        if last_only and targets is None:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden(self, idx: torch.Tensor, cache: Cache | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output (B, T, n_embd) for token ids (B, T): everything but the head.

        ``segments`` (B, T): the number of the example each token belongs to, when several are
        packed into a row (equal numbers are contiguous). Each example then counts its positions
        from 0 and its tokens attend only to earlier tokens of the same example, so a packed row
        gives every example the numbers it would get alone."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        if cache is None and segments is None:
            pos, mask = torch.arange(T, device=idx.device), None
            rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.rope_cos is not None else None
        else:
            if segments is not None:  # packed examples: positions restart, attention stays inside each
                if cache is not None:
                    raise ValueError("segments are for training on packed examples, not for a KV cache")
                pos, mask = segment_positions(segments), segment_mask(segments)  # (B, T), (B, 1, T, T)
            else:  # each row counts from its first real token; the mask hides other rows' padding
                pos, mask = cache.positions(T), cache.attn_mask(T)  # (B, T), (B, 1, T, S)
            rope = None
            if self.rope_cos is not None:  # (B, 1, T, head_dim/2): one row of positions per batch row
                rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * params for the matmuls plus the attention term
        (PaLM appendix B; the same estimate nanoGPT uses for MFU)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
