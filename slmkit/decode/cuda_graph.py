"""Decoding on a GPU, where launching kernels and not running them sets the speed.

A decode step of a small model is about a hundred kernels of a few microseconds each, and the
Python that launches them takes longer than the GPU takes to run them: on an H200, ``StepDecoder``
ran stories15m in bf16 at 2.5-4 ms per token at batch 1, and a step at batch 32 took about as long
(``bench/decode.py --device cuda``). ``GraphDecoder`` records the step once as a CUDA graph and
then replays it, one launch per step.

A graph replays fixed kernels on fixed memory, so its step differs from ``StepDecoder`` in two
ways (same math, tested to give the same logits): it attends over all of the cache's slots, with
the slots not yet filled (and a padded row's padding) masked out by a mask made on the GPU from
the filled length, instead of over a slice that grows every step; and it writes the new key and
value at a slot index held in a GPU tensor. The token ids, the filled length and the rows' start
slots are copied into fixed input buffers before each replay.

A graph belongs to one cache (its buffers and batch size). When the cache changes (the window
slides, finished rows leave the batch, beam search reorders its beams), the first step on the new
cache runs without a graph, and the second records a new one; beam search, which reorders every
step, so never records. Recording synchronises the GPU (milliseconds), so a batch whose rows
finish one by one pays that once per finished row. If recording fails, the decoder warns once and
runs without graphs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from slmkit.decode.base import ANY, SIZES, Decoder
from slmkit.decode.cache import KVCache
from slmkit.decode.step import decode_norm, decode_qkv, decode_rest, decode_weights, rope_matrix
from slmkit.model import GPT


class GraphDecoder(Decoder):
    """``step(idx, cache) -> logits`` like ``StepDecoder``, replayed from a CUDA graph.

    The registry offers it on CUDA only; ``graphs=False`` (the default off CUDA) runs the same
    fixed-shape step without recording on any device: how the CPU tests check its math."""

    name = "cuda-graph"
    devices = {"cuda"}
    handles = {**SIZES, "norm": {"layernorm", "rmsnorm"}, "positions": {"learned", "rope"},
               "activation": {"gelu", "swiglu"}, "n_kv_head": ANY, "bias": {False, True},
               "tie_embeddings": {False, True}}

    def __init__(self, model: GPT, graphs: bool | None = None) -> None:
        self.check(model, placed=False)  # its math runs anywhere; graphs need CUDA
        super().__init__(model)
        self.weights = decode_weights(model)
        self.device = model.tok_emb.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.key: tuple | None = None  # the cache (and batch size) of the last step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0  # steps served by a graph (tests read it)

    @torch.no_grad()  # also when called outside inference mode: no autograd history through the cache
    def step(self, idx: torch.Tensor, cache: KVCache, need: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row, ids (B,) -> next-token logits (B, vocab); fills one cache slot."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + 1 tokens > {cache.max_len} slots")
        key = (idx.size(0), cache.max_len, cache.k.data_ptr(), cache.v.data_ptr())
        if key != self.key:
            self._new_inputs(idx.size(0), cache.max_len)
            self.graph, self.key = None, key
            logits = self._run_eagerly(idx, cache)
        else:
            if self.graph is None and self.graphs:
                self._record(idx, cache)
            logits = self._replay(idx, cache) if self.graph is not None else self._run_eagerly(idx, cache)
        cache.length += 1
        return logits

    def _new_inputs(self, batch: int, slots: int) -> None:
        # Made outside inference mode, so that the decoder also works when later called outside it.
        with torch.inference_mode(False):
            self.idx = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.start = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.length = torch.zeros(1, dtype=torch.long, device=self.device)
            self.slots = torch.arange(slots, device=self.device)

    def _set_inputs(self, idx: torch.Tensor, cache: KVCache) -> None:
        self.idx.copy_(idx, non_blocking=True)
        self.start.copy_(cache.start, non_blocking=True)
        self.length.fill_(cache.length)

    def _run_eagerly(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self._set_inputs(idx, cache)
        return self._fixed_step(cache)

    def _replay(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self._set_inputs(idx, cache)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()  # the next replay overwrites out; callers may keep these logits

    def _record(self, idx: torch.Tensor, cache: KVCache) -> None:
        """Record ``_fixed_step`` on this cache as a graph (recording runs nothing; the step is then
        replayed). If recording fails, warn and go on without graphs."""
        try:
            self.graph, self.out = self._capture(idx, cache)
        except Exception as e:  # noqa: BLE001 - a GPU or driver without graph support still generates
            warnings.warn(f"CUDA graph recording failed ({type(e).__name__}: {e}); decoding without graphs",
                          stacklevel=4)
            self.graphs = False

    def _capture(self, idx: torch.Tensor, cache: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of ``_fixed_step`` on this cache, and its output buffer."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):  # the model's GPU, not GPU 0
                # Run the step once on the recording stream first, so that its library handles
                # exist before recording. With this step's inputs it writes this step's slot, which
                # the replay then writes again with the same values.
                self._set_inputs(idx, cache)
                self._fixed_step(cache)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    out = self._fixed_step(cache)
            return graph, out
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def _fixed_step(self, cache: KVCache) -> torch.Tensor:
        """``StepDecoder``'s math on fixed shapes and addresses, reading the input buffers."""
        model, w, c = self.model, self.weights, self.model.config
        B, L = self.idx.size(0), cache.max_len
        H, KV, D = c.n_head, c.kv_heads, c.head_dim
        pos = (self.length - self.start).clamp_(min=0)  # (B,) the new token's position in its row
        x = F.embedding(self.idx, model.tok_emb.weight)
        if model.pos_emb is not None:
            x = x + model.pos_emb.weight[pos]
        rot = None
        if model.rope_cos is not None:  # (B, D, D): one rotation per row for all its heads
            rot = rope_matrix(model.rope_cos[pos], model.rope_sin[pos]).to(x.dtype)
        eps = x.new_full((1,), c.norm_eps)
        # Slots a row may attend to: its own (from its start) up to and including the new token.
        real = (self.slots >= self.start[:, None]) & (self.slots <= self.length)  # (B, L)
        bias = x.new_zeros(B, 1, L).masked_fill_(~real[:, None], float("-inf"))
        bias = bias.expand(B, KV, L).reshape(B * KV, 1, L)
        keys, values = cache.k.view(c.n_layer, B * KV, L, D), cache.v.view(c.n_layer, B * KV, L, D)
        for layer, k_cache, v_cache in zip(w.layers, keys, values):
            q, k, v = decode_qkv(layer, x, c, eps, rot)
            k_cache.index_copy_(1, self.length, k.reshape(B * KV, 1, D))
            v_cache.index_copy_(1, self.length, v.reshape(B * KV, 1, D))
            q = q.reshape(B * KV, H // KV, D)
            scores = torch.baddbmm(bias, q, k_cache.transpose(1, 2), alpha=D**-0.5)
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            x = decode_rest(layer, x, torch.bmm(probs, v_cache).view(B, H * D), c, eps)
        return w.head(decode_norm(x, w.norm, c, eps))
