"""The decode step in C++: one call per step runs every layer and the head (``csrc/decode.cpp``).

``CPUDecoder`` spends about half of a token on Python calls (about 200 of 1-4 us) and its
matrix-vector products run at the speed of the CPU vendor's BLAS through PyTorch (44-51 GB/s with
MKL on an AMD EPYC, issue 19). ``NativeDecoder`` makes one ctypes call per step: embeddings, norms,
rotary or learned positions, attention over the ``KVCache`` (grouped query heads, each row from its
own first real slot: left padding), GELU or SwiGLU, biases and the tied or untied head, for every
row of the batch. The products are AVX-512 or AVX2 code picked from the CPU at run time (scalar
elsewhere, ARM included), threaded over ``torch.get_num_threads()`` cores by a pool whose idle
threads sleep after a short spin; the thread count does not change any result.

The library is the one ``cpu_kernels`` builds once per machine (same cache, same compiler). Where
it cannot be built, ``why_not`` says so, the registry takes the next backend (the NumPy one), and
one note says why.

A quantized run (``slm quantize``) decodes here on its int8 / int4 blocks themselves
(``quant.PackedWeight``, GGUF's q8_0 / q4_0 layout), not on the float32 values its checkpoint also
unpacks for ``model.forward`` (the prefill and every other backend): ``csrc/qdecode.cpp`` quantizes
each activation row to int8 blocks of 32 once per product and computes the products as integer
dots (AVX-512 VNNI, AVX-VNNI, AVX2 or scalar, all giving the same bits). ``PACKED_GROUPS`` says
which blocks it reads: groups that are multiples of 32 (every ``slm quantize`` setting at sizes
that are multiples of 32); others decode on the float32 values, with one note. The logits then
differ from the float path's by the activations' rounding to 8 bits (tests/test_qdecode.py).
``SLMKIT_DECODE_ISA`` (``avx512``, ``avx2``, ``scalar``) forces an instruction
set, e.g. to test the AVX2 code on an AVX-512 machine.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from slmkit import cpu_kernels
from slmkit.decode.base import ANY, SIZES, Decoder
from slmkit.decode.cache import KVCache
from slmkit.model import GPT
from slmkit.quant import PackedWeight, packed_weight

ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
KINDS = {8: 1, 4: 2}  # bits -> qdecode.h's kind
_noted = False
_packed_notes: set[str] = set()


def packed_format(p: PackedWeight | None) -> int:
    """qdecode.h's format code of packed blocks (kind | group << 8), or 0: decode the float32 values.
    Blocks of ``p.group`` values are read when the group is a multiple of 32 dividing the row."""
    if p is None:
        return 0
    if p.bits not in KINDS or p.group % 32 or p.shape[1] % p.group:
        why = f"int{p.bits} blocks of {p.group} values (rows of {p.shape[1]})"
        if why not in _packed_notes:
            _packed_notes.add(why)
            print(f"note: the C++ decoder computes on int8/int4 blocks of multiples of 32 values, not {why}: "
                  "this run decodes on their float32 values", file=sys.stderr)
        return 0
    return KINDS[p.bits] | p.group << 8


def library_why_not() -> str | None:
    """None when the C++ decoder can run here, else why not (one line, printed once as a note)."""
    global _noted
    why = cpu_kernels.built()
    if why is not None and not _noted:
        _noted = True
        print(f"note: slmkit's C++ decoder is off ({why}); decoding uses the NumPy path", file=sys.stderr)
    return why


def best_isa() -> str:
    """The instruction set the products use on this CPU by default: avx512, avx2 or scalar."""
    lib = cpu_kernels.library()
    return "scalar" if lib is None else {v: k for k, v in ISAS.items()}[lib.slm_decode_isa()]


class NativeDecoder(Decoder):
    """The decode step for float32 on the CPU, in C++ (see the module docstring). ``isa`` forces
    an instruction set (default: ``SLMKIT_DECODE_ISA`` or the best one), ``threads`` a thread
    count (default: ``torch.get_num_threads()`` at each step). Inference only (eval mode).
    ``packed=False`` decodes a quantized run on its float32 values (for comparisons)."""

    name = "cpp"
    devices = {"cpu"}
    dtypes = {torch.float32}
    handles = {**SIZES, "norm": {"layernorm", "rmsnorm"}, "positions": {"learned", "rope"},
               "activation": {"gelu", "swiglu"}, "n_kv_head": ANY, "bias": {False, True},
               "tie_embeddings": {False, True}}

    @classmethod
    def why_not(cls, model: GPT, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
        why = super().why_not(model, device, dtype)
        return why if why is not None else library_why_not()

    def __init__(self, model: GPT, isa: str | None = None, threads: int | None = None, packed: bool = True) -> None:
        self.check(model)
        super().__init__(model)
        isa = isa or os.environ.get("SLMKIT_DECODE_ISA", "auto")
        if isa not in ISAS:
            raise ValueError(f"unknown instruction set {isa!r}: choose one of {', '.join(ISAS)}")
        self.lib, self.isa_name, self.isa, self.threads = cpu_kernels.library(), isa, ISAS[isa], threads
        c = model.config
        hidden = model.blocks[0].mlp.down.in_features
        self.cfg = torch.tensor([c.vocab_size, c.n_layer, c.n_head, c.kv_heads, c.head_dim, c.n_embd, hidden,
                                 c.norm == "layernorm", c.positions == "rope", c.activation == "swiglu"],
                                dtype=torch.int64)

        def norm(m: torch.nn.Module) -> list[torch.Tensor | None]:
            return [m.weight, getattr(m, "bias", None)]

        def weight(m: torch.nn.Module) -> torch.Tensor | PackedWeight:
            """The module's int8/int4 blocks where this decoder reads them, else its float weight."""
            p = packed_weight(m) if packed else None
            return p if packed_format(p) else m.weight

        head = weight(model.lm_head)
        if model.lm_head.weight is model.tok_emb.weight:  # tied: the embedding's blocks, if any
            head = weight(model.tok_emb)
        tensors = [weight(model.tok_emb), None if model.pos_emb is None else model.pos_emb.weight,
                   model.rope_cos, model.rope_sin, *norm(model.norm), head, model.lm_head.bias]
        for b in model.blocks:
            for part in (norm(b.norm1), b.attn.qkv, b.attn.proj, norm(b.norm2), b.mlp.up, b.mlp.down):
                tensors += part if isinstance(part, list) else [weight(part), part.bias]
        # Contiguous float32 views of the parameters (copies only where a tensor is not dense), or
        # the packed blocks with their format code, kept alive here: the C++ side holds their addresses.
        self.formats = torch.tensor([packed_format(t) if isinstance(t, PackedWeight) else 0 for t in tensors],
                                    dtype=torch.int64)
        self.tensors = [None if t is None else t.blocks if isinstance(t, PackedWeight) else t.detach().float().contiguous()
                        for t in tensors]
        self.pointers = (ctypes.c_void_p * len(self.tensors))(*(0 if t is None else t.data_ptr() for t in self.tensors))
        self.packed = bool(self.formats.any())
        self.eps = c.norm_eps

    def step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row, ids (B,) -> next-token logits (B, vocab), as ``StepDecoder``."""
        B, S = idx.size(0), cache.length
        if S >= cache.max_len:
            raise ValueError(f"KV cache full: {S} + 1 tokens > {cache.max_len} slots")
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()):
            cache.k, cache.v = cache.k.contiguous(), cache.v.contiguous()
        ids = idx.to(torch.int64).contiguous()
        start = cache.start.contiguous()
        logits = torch.empty(B, self.model.config.vocab_size)
        threads = self.threads or torch.get_num_threads()
        rc = self.lib.slm_decode_step(self.cfg.data_ptr(), self.pointers, self.eps, ids.data_ptr(), start.data_ptr(),
                                      B, S, cache.max_len, cache.k.data_ptr(), cache.v.data_ptr(), logits.data_ptr(),
                                      threads, self.isa, self.formats.data_ptr())
        if rc == 1:
            raise IndexError(f"token ids must be in [0, {self.model.config.vocab_size}), got {ids.tolist()}")
        if rc == 2:
            raise ValueError(f"this CPU cannot run the {self.isa_name} code (best: {best_isa()})")
        cache.length = S + 1
        return logits
