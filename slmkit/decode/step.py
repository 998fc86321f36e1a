"""The PyTorch decode step: one token per row, written straight through over the weights.

At batch 1 on a CPU the matrix-vector products of a step take under half of its time and the rest
is per-call overhead (2-5 us per PyTorch call), so this counts calls: weights looked up once per
generation (``DecodeWeights``); rotary positions as one matmul with a rotation matrix made once
per step for all layers; attention as ``baddbmm`` (scaled, and masked only for padded batches),
softmax and ``bmm`` over the cache, with query heads grouped by their key/value head (GQA without
copies); RMSNorm in three calls; residual adds fused into the matmuls. The same math as
``model.forward`` with the cache (tested to give the same logits). It skips dropout and module
hooks: it is for inference (under ``torch.inference_mode``), in eval mode. ``GraphDecoder``
replays these pieces from a CUDA graph; ``CPUDecoder`` hands its large steps to this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmkit.decode.base import ANY, SIZES, Decoder
from slmkit.decode.cache import KVCache
from slmkit.model import GPT, ModelConfig, activate


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation ``model.apply_rope`` does at one position, as a (head_dim, head_dim) matrix R
    with ``x @ R == apply_rope(x)`` for row vectors; cos and sin (..., head_dim/2) give (..., D, D).
    Decoding rotates every query and key head of a layer with one matmul this way."""
    c, s = torch.diag_embed(cos), torch.diag_embed(sin)
    # (x1, x2) @ [[c, s], [-s, c]] = (x1 cos - x2 sin, x1 sin + x2 cos)
    return torch.cat((torch.cat((c, s), -1), torch.cat((-s, c), -1)), -2)


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
    """Every tensor a decode step reads, gathered once per generation (``decode_weights``).
    A step at batch 1 makes a few hundred small PyTorch calls, and each module attribute lookup
    costs about as much as one of them: looking the weights up once made decoding 1.2x faster.
    Views of the model's parameters, not copies: valid while the model's modules stay the same."""

    layers: list[LayerWeights]
    norm: tuple[torch.Tensor, torch.Tensor | None]
    head: LinearT


def decode_weights(model: GPT) -> DecodeWeights:
    """The tensors a decode step reads, looked up once (see ``DecodeWeights``)."""

    def norm(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return m.weight, getattr(m, "bias", None)  # RMSNorm has no bias

    layers = [
        LayerWeights(norm(b.norm1), LinearT.of(b.attn.qkv), LinearT.of(b.attn.proj),
                     norm(b.norm2), LinearT.of(b.mlp.up), LinearT.of(b.mlp.down))
        for b in model.blocks
    ]
    return DecodeWeights(layers, norm(model.norm), LinearT.of(model.lm_head))


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


class StepDecoder(Decoder):
    """The PyTorch fast path of generation (see the module docstring): any device and dtype, plain
    ``nn.Linear`` layers. For float32 on the CPU ``CPUDecoder`` is faster at small batches, on a
    GPU ``GraphDecoder``."""

    name = "step"
    handles = {**SIZES, "norm": {"layernorm", "rmsnorm"}, "positions": {"learned", "rope"},
               "activation": {"gelu", "swiglu"}, "n_kv_head": ANY, "bias": {False, True},
               "tie_embeddings": {False, True}}

    def __init__(self, model: GPT) -> None:
        self.check(model, placed=False)
        super().__init__(model)
        self.weights = decode_weights(model)  # looked up once per generation, not per step

    def step(self, idx: torch.Tensor, cache: KVCache, need: torch.Tensor | None = None) -> torch.Tensor:
        B, S = idx.size(0), cache.length
        if S >= cache.max_len:
            raise ValueError(f"KV cache full: {S} + 1 tokens > {cache.max_len} slots")
        model, w, c = self.model, self.weights, self.model.config
        H, KV, D = c.n_head, c.kv_heads, c.head_dim
        # Position of the new token: S in every row, unless rows are padded.
        pos = cache.positions(1)[:, 0] if cache.padded else S  # (B,) or an int
        x = F.embedding(idx, model.tok_emb.weight)  # (B, C)
        if model.pos_emb is not None:
            x = x + model.pos_emb.weight[pos]
        rot = rope_matrix(model.rope_cos[pos], model.rope_sin[pos]).to(x.dtype) if model.rope_cos is not None else None
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
