"""Decoding on the CPU, where per-call overhead and not arithmetic sets the speed.

``StepDecoder`` (the PyTorch step) makes about 200 PyTorch calls per token. At batch 1 on a CPU
each costs 2-3 us of Python binding, dispatch and allocation: as long, all together, as the
matrix-vector products that do the actual work. A NumPy call on an array of a few hundred numbers costs under 1 us.
``CPUDecoder`` does the same math as the PyTorch step (tested to give the same logits): the matrix
products stay in PyTorch (MKL, written into preallocated buffers), and everything between them
(norms, rotary positions, KV-cache writes, attention over the cache, activations) runs in NumPy
on arrays that share memory with those buffers and with the ``KVCache``. At the stories15m shape
this is 1.2-1.3x the PyTorch step at batch 1 (``bench/decode.py``), 1.3-1.7x at stories260k.
NumPy runs on one thread, so as the work of a step grows, PyTorch's kernels (two threads once
arrays are large enough to split) catch up, first in attention over a long cache: at batch 1,
stories42m (width 512) is 1.05-1.10x with 16 cached tokens, even at 400 and 0.9x at 900; at
stories15m, batch 4 over 16-272 cached tokens is still 1.1x, batch 8 even. So a step whose rows x
attended positions (the cache and the new token) x width exceeds 2^18 goes to ``StepDecoder``.
It is for float32 models on the CPU; the registry picks ``GraphDecoder`` on GPUs and
``StepDecoder`` (or the module path) for everything else (bf16 / fp16 on the CPU, int8-quantized
linear layers).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from slmkit.decode.base import ANY, SIZES, Decoder
from slmkit.decode.cache import KVCache
from slmkit.decode.step import StepDecoder
from slmkit.model import GPT


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _norm_arrays(wb: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[np.ndarray, np.ndarray | None]:
    w, b = wb
    return _numpy(w), None if b is None else _numpy(b)


def _pair(*shape: int) -> tuple[np.ndarray, torch.Tensor]:
    """A float32 buffer seen both as a NumPy array and as a tensor (one memory). Made outside
    inference mode, so that the decoder also works when later called outside it."""
    a = np.zeros(shape, np.float32)
    with torch.inference_mode(False):
        return a, torch.from_numpy(a)


# ndarray.mean and np.split are Python functions over several calls: sums and slices are cheaper.


def _mean(x: np.ndarray) -> np.ndarray:
    m = np.add.reduce(x, -1, keepdims=True)
    m *= 1.0 / x.shape[-1]
    return m


def _rms_norm(x: np.ndarray, w: np.ndarray, b: None, eps: float, out: np.ndarray) -> None:
    """RMSNorm into ``out``; ``b`` (always None) keeps the signature of ``_layer_norm``."""
    if x.shape[0] == 1:  # batch 1, the common case: one dot product and a Python float (1.1x a token)
        row = x[0]
        np.multiply(x, 1.0 / math.sqrt(float(np.dot(row, row)) / row.shape[0] + eps), out=out)
    else:
        np.multiply(x, x, out=out)
        scale = _mean(out)
        scale += eps
        np.sqrt(scale, out=scale)
        np.divide(x, scale, out=out)
    out *= w


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float, out: np.ndarray) -> None:
    if x.shape[0] == 1:  # batch 1: the mean and variance as Python floats, as in _rms_norm
        row = out[0]
        np.subtract(x, float(np.add.reduce(x[0])) / row.shape[0], out=out)
        out *= 1.0 / math.sqrt(float(np.dot(row, row)) / row.shape[0] + eps)
    else:
        np.subtract(x, _mean(x), out=out)
        scale = _mean(np.square(out))
        scale += eps
        np.sqrt(scale, out=scale)
        out /= scale
    out *= w
    if b is not None:
        out += b


def _swiglu(h: np.ndarray, out: np.ndarray) -> None:
    """silu(gate) * up on the (gate, up) halves of h; exp may overflow to inf, giving silu = -0."""
    half = h.shape[-1] // 2
    gate, up = h[:, :half], h[:, half:]
    np.negative(gate, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(h: np.ndarray, out: np.ndarray) -> None:
    """0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), as F.gelu(approximate="tanh")."""
    np.multiply(h, h, out=out)
    out *= h
    out *= 0.044715
    out += h
    out *= _GELU_C
    np.tanh(out, out=out)
    out += 1.0
    out *= h
    out *= 0.5


class _Rotations:
    """``step.rope_matrix`` in NumPy: (..., D, D) rotations for positions, 4 calls instead of 8."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = _numpy(cos), _numpy(sin)  # (block_size, D/2)
        half = self.cos.shape[-1]
        D, i = 2 * half, np.arange(half)
        # flat indices of the four diagonals of [[c, s], [-s, c]] in a (D, D) matrix
        self.index = np.concatenate([i * D + i, i * D + half + i, (half + i) * D + i, (half + i) * D + half + i])
        self.D = D

    def __call__(self, pos: int | np.ndarray) -> np.ndarray:
        c, s = self.cos[pos], self.sin[pos]
        out = np.zeros(c.shape[:-1] + (self.D * self.D,), np.float32)
        out[..., self.index] = np.concatenate([c, s, -s, c], -1)
        return out.reshape(c.shape[:-1] + (self.D, self.D))


def _softmax_(s: np.ndarray) -> None:
    s -= np.maximum.reduce(s, -1, keepdims=True)
    np.exp(s, out=s)
    s /= np.add.reduce(s, -1, keepdims=True)


class _Buffers:
    """Every activation of one step at batch size B, allocated once."""

    def __init__(self, B: int, model: GPT) -> None:
        c = model.config
        hidden = model.blocks[0].mlp.down.in_features
        width = 2 * hidden if c.activation == "swiglu" else hidden
        H, KV, D = c.n_head, c.kv_heads, c.head_dim
        self.x, self.x_t = _pair(B, c.n_embd)  # the residual stream
        self.h, self.h_t = _pair(B, c.n_embd)  # its norm
        self.qkv, self.qkv_t = _pair(B, (H + 2 * KV) * D)
        self.att, self.att_t = _pair(B, c.n_embd)
        self.up, self.up_t = _pair(B, width)
        self.act, self.act_t = _pair(B, hidden)
        # Views made once (each costs a call a layer): queries and keys as heads, rotated into
        # their own buffer with rotary positions; queries, values and the attention output with
        # the query heads grouped by the key/value head they read, (B, KV, H / KV, D).
        self.qk = self.qkv[:, : (H + KV) * D].reshape(B, H + KV, D)
        rotated = np.zeros_like(self.qk) if c.positions == "rope" else self.qk
        self.qk_rotated = rotated
        self.q = rotated[:, :H].reshape(B, KV, H // KV, D)
        self.k = rotated[:, H:]  # (B, KV, D)
        self.v = self.qkv[:, (H + KV) * D :].reshape(B, KV, D)
        self.att_heads = self.att.reshape(B, KV, H // KV, D)
        assert all(np.shares_memory(a, b) for a, b in ((self.qk, self.qkv), (self.v, self.qkv), (self.att_heads, self.att)))


class CPUDecoder(Decoder):
    """The decode step for float32 on the CPU, with the small operations in NumPy.

    Make one per generation (it looks the weights up once) and call ``step(idx, cache)``. Steps
    with more than ``max_work`` rows x attended positions x width go to ``StepDecoder`` (its
    ``fallback``). It follows the cache through ``KVCache.reorder`` and a changing batch size.
    Inference only (eval mode)."""

    name = "numpy"
    devices = {"cpu"}
    dtypes = {torch.float32}
    handles = {**SIZES, "norm": {"layernorm", "rmsnorm"}, "positions": {"learned", "rope"},
               "activation": {"gelu", "swiglu"}, "n_kv_head": ANY, "bias": {False, True},
               "tie_embeddings": {False, True}}

    def __init__(self, model: GPT, max_work: int = 2**18) -> None:
        self.check(model)
        super().__init__(model)
        self.config, self.max_work = model.config, max_work
        self.fallback = StepDecoder(model)  # the large steps
        self.weights = self.fallback.weights  # the matmuls, in PyTorch
        self.tok_emb = _numpy(model.tok_emb.weight)
        self.pos_emb = _numpy(model.pos_emb.weight) if model.pos_emb is not None else None
        self.norm = _rms_norm if self.config.norm == "rmsnorm" else _layer_norm
        self.activate = _swiglu if self.config.activation == "swiglu" else _gelu_tanh
        self.norms = [(_norm_arrays(layer.norm1), _norm_arrays(layer.norm2)) for layer in self.weights.layers]
        self.final_norm = _norm_arrays(self.weights.norm)
        self.rotations = _Rotations(model.rope_cos, model.rope_sin) if model.rope_cos is not None else None
        self.buffers: dict[int, _Buffers] = {}

    def step(self, idx: torch.Tensor, cache: KVCache, need: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row, ids (B,) -> next-token logits (B, vocab), as ``StepDecoder``."""
        B, S = idx.size(0), cache.length
        if B * (S + 1) * self.config.n_embd > self.max_work:
            return self.fallback.step(idx, cache)
        if S >= cache.max_len:
            raise ValueError(f"KV cache full: {S} + 1 tokens > {cache.max_len} slots")
        c, model = self.config, self.model
        D, eps = c.head_dim, c.norm_eps
        if B not in self.buffers:
            self.buffers[B] = _Buffers(B, model)
        buf = self.buffers[B]
        x, h = buf.x, buf.h
        pos = cache.positions(1)[:, 0].numpy() if cache.padded else S  # one per row, or one for all
        ids = idx.numpy()
        if ids.min() < 0:  # NumPy would count from the end; torch's embedding refuses
            raise IndexError(f"token ids must be >= 0, got {ids.min()}")
        np.take(self.tok_emb, ids, axis=0, out=x)
        if self.pos_emb is not None:
            x += self.pos_emb[pos]
        rot = self.rotations(pos) if self.rotations is not None else None  # (D, D) or (B, D, D)
        bias = None  # when padded, an additive mask over the slots, (B, 1, 1, S + 1), for all heads of a row
        if cache.padded:
            bias = np.where(cache.attn_mask(1).numpy(), np.float32(0), np.float32(-np.inf))
        # (n_layer, B, KV, max_len, D): the cache itself, so writes land in it
        keys, values = cache.k.numpy(), cache.v.numpy()
        scale = D**-0.5
        with np.errstate(over="ignore"):  # exp(-gate) = inf in SwiGLU is the right limit
            for layer, (norm1, norm2), k_cache, v_cache in zip(self.weights.layers, self.norms, keys, values):
                self.norm(x, *norm1, eps, out=h)
                layer.qkv.into(buf.h_t, buf.qkv_t)
                if rot is not None:
                    np.matmul(buf.qk, rot, out=buf.qk_rotated)
                k_cache[:, :, S] = buf.k
                v_cache[:, :, S] = buf.v
                scores = np.matmul(buf.q, k_cache[:, :, : S + 1].swapaxes(2, 3))  # (B, KV, H / KV, S + 1)
                scores *= scale
                if bias is not None:
                    scores += bias
                _softmax_(scores)
                np.matmul(scores, v_cache[:, :, : S + 1], out=buf.att_heads)
                layer.proj.add_into(buf.x_t, buf.att_t)
                self.norm(x, *norm2, eps, out=h)
                layer.up.into(buf.h_t, buf.up_t)
                self.activate(buf.up, out=buf.act)
                layer.down.add_into(buf.x_t, buf.act_t)
            self.norm(x, *self.final_norm, eps, out=h)
        cache.length = S + 1
        return self.weights.head(buf.h_t)  # a new tensor: callers may keep it past the next step
